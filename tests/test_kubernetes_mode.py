"""The `kubernetes` runner mode without a cluster: the DAG parses in it, and the provider's own pod builder
(KubernetesPodOperator.build_pod_request_obj) yields the pod we mean: the stage's image and argv, secrets
only as Kubernetes Secret references, GPU limits and scheduling from configuration."""

from __future__ import annotations

import json

import pytest
from dermaops.pipeline import stage

from tests.test_dag_integrity import STAGES, TORCH_STAGES, airflow_config, docker_dag, parse  # noqa: F401

SECRET_VALUES = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-value", "SLACK_BOT_TOKEN": "xoxb-s3cr3t-slack-value"}
K8S_ENV = {
    "DERMAOPS_RUNNER": "kubernetes",
    "DERMAOPS_GPU": "1",
    "DERMAOPS_K8S_GPUS": "2",
    "DERMAOPS_K8S_NAMESPACE": "dermaops-jobs",
    "DERMAOPS_K8S_NODE_SELECTOR": json.dumps({"pool": "batch"}),
    "DERMAOPS_K8S_GPU_NODE_SELECTOR": json.dumps({"pool": "gpu", "gpu-type": "h100"}),
    "DERMAOPS_K8S_TOLERATIONS": json.dumps([{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]),
    "DERMAOPS_K8S_SLACK_SECRET": "team-slack",
    "DERMAOPS_DATA_IMAGE": "registry.example/dermaops-data:7",
    "DERMAOPS_TORCH_IMAGE": "registry.example/dermaops-torch:7",
    **SECRET_VALUES,
}


@pytest.fixture
def k8s_dag(airflow_config, monkeypatch):  # noqa: F811
    return parse(monkeypatch, **K8S_ENV)


def _pod(task) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(task.build_pod_request_obj(dry_run=True))


def test_dag_parses_in_kubernetes_mode_with_the_same_argv(k8s_dag, docker_dag):  # noqa: F811
    from dermaops_runner.kubernetes_mode import KubernetesStageOperator

    for task_id in STAGES:
        task = k8s_dag.get_task(task_id)
        assert isinstance(task, KubernetesStageOperator)
        assert task.arguments == docker_dag.get_task(task_id).command
        assert task.image == docker_dag.get_task(task_id).image


def test_the_provider_builds_the_expected_pods(k8s_dag):
    for task_id in STAGES:
        task = k8s_dag.get_task(task_id)
        pod = _pod(task)
        assert pod["metadata"]["namespace"] == "dermaops-jobs"
        assert pod["metadata"]["labels"]["dermaops/stage"] == task_id
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never"
        [container] = spec["containers"]  # no XCom sidecar: the summary comes from the log
        assert container["image"] == f"registry.example/dermaops-{'torch' if task_id in TORCH_STAGES else 'data'}:7"
        assert not container.get("command")  # empty = the image's entrypoint, as in docker mode
        assert container["args"][:4] == ["python", "-m", "dermaops", task_id]

        # Secrets: whole Kubernetes Secrets through envFrom; the plain env holds nothing secret. The data
        # source's token is optional (a public source needs none): the pod starts without that Secret.
        refs = {
            source["secretRef"]["name"]: source["secretRef"].get("optional", False) for source in container["envFrom"]
        }
        # S3: the Secret of the stage's role (dermaops.access), so train gets no key that writes registry/.
        s3 = f"dermaops-s3-{stage(task_id).s3_role}"
        expected = {
            "notify": {s3: False, "team-slack": False},
            "ingest": {s3: False, "dermaops-source": True},
        }
        assert refs == expected.get(task_id, {s3: False})
        assert s3 == {"train": "dermaops-s3-train", "evaluate": "dermaops-s3-registry"}.get(task_id, s3)
        assert container["env"] == [{"name": "PYTHONUNBUFFERED", "value": "1"}]
        text = json.dumps(pod)
        for name, value in SECRET_VALUES.items():
            assert value not in text and name not in text

        tolerations = [t["key"] for t in spec["tolerations"]]
        if task_id in TORCH_STAGES:
            assert container["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
            assert spec["nodeSelector"] == {"pool": "gpu", "gpu-type": "h100"}
            assert tolerations == ["spot", "nvidia.com/gpu"]
            [shm] = spec["volumes"]
            # train: a process per GPU, each with DataLoader workers passing batches through /dev/shm.
            shm_gib = 16 if task_id == "train" else 2
            assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": str(shm_gib * 1024**3)}
            assert container["volumeMounts"] == [{"mountPath": "/dev/shm", "name": shm["name"]}]
        else:
            assert "resources" not in container
            assert spec["nodeSelector"] == {"pool": "batch"}
            assert tolerations == ["spot"]
            assert not spec.get("volumes")


def test_without_gpus_no_stage_asks_for_one(airflow_config, monkeypatch):  # noqa: F811
    dag = parse(monkeypatch, **{**K8S_ENV, "DERMAOPS_GPU": "0"})
    for task_id in TORCH_STAGES:
        spec = _pod(dag.get_task(task_id))["spec"]
        assert "resources" not in spec["containers"][0] and spec["nodeSelector"] == {"pool": "batch"}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DERMAOPS_K8S_NODE_SELECTOR", "pool=gpu", "DERMAOPS_K8S_NODE_SELECTOR must be a JSON object, got 'pool=gpu'"),
        (
            "DERMAOPS_K8S_TOLERATIONS",
            '[{"taint": "x"}]',
            "DERMAOPS_K8S_TOLERATIONS: {'taint': 'x'} is not a toleration",
        ),
        ("DERMAOPS_K8S_GPUS", "all", "DERMAOPS_K8S_GPUS must be a positive integer, got 'all'"),
    ],
)
def test_bad_configuration_is_an_import_error_naming_it(airflow_config, monkeypatch, name, value, message):  # noqa: F811
    from airflow.dag_processing.dagbag import DagBag

    from tests.support.airflow_env import ROOT

    for key, val in {**K8S_ENV, name: value}.items():
        monkeypatch.setenv(key, val)
    bag = DagBag(dag_folder=ROOT / "dags")
    errors = bag.import_errors.values()
    assert len(errors) == 2 and all(message in error for error in errors)  # every DAG file refuses it


def test_the_helm_values_configure_this_mode(airflow_config, monkeypatch):  # noqa: F811
    import yaml
    from dermaops_runner.kubernetes_mode import pod_settings
    from dermaops_runner.stages import spec_for

    from tests.support.airflow_env import ROOT

    values = yaml.safe_load((ROOT / "docs" / "kubernetes" / "values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor" and values["airflowVersion"] == "3.3.2"
    assert values["allowPodLaunching"] is True
    env = {item["name"]: item["value"] for item in values["env"]}
    assert env["DERMAOPS_RUNNER"] == "kubernetes"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    train = pod_settings(spec_for("train"))
    assert train["namespace"] == "dermaops"
    assert train["container_resources"].limits == {"nvidia.com/gpu": "1"}
    assert train["node_selector"] == {"kubernetes.io/os": "linux", "nvidia.com/gpu.present": "true"}
    assert [t.key for t in train["tolerations"]] == ["nvidia.com/gpu"]
    assert pod_settings(spec_for("split"))["container_resources"] is None
