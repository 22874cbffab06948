"""Kubernetes mode: a pod per stage (the cncf.kubernetes provider's KubernetesPodOperator), running the
stage's image with the same argv as the other modes. NOT YET RUN ON A CLUSTER: tests check the pod
the provider builds (image, argv, secrets, GPU limits, scheduling), not a live run.

The argv goes into the container's `args` (Docker's CMD), as docker mode passes it as the container
command, so the images' entrypoint behaves the same in both.

Secrets come from Kubernetes Secrets, never from plain env values in the pod spec: each credential
set a stage receives is one Secret whose keys are the variable names the stages read (see
credentials.py), injected whole through `envFrom.secretRef`:

- "s3":    Secret `dermaops-s3-<role>`, the key of the stage's role (dermaops.access: which prefixes it may
           write), or DERMAOPS_K8S_S3_SECRET, one Secret for every stage: AWS_ACCESS_KEY_ID,
           AWS_SECRET_ACCESS_KEY, optionally AWS_DEFAULT_REGION, DERMAOPS_S3_ENDPOINT_URL;
- "slack": Secret DERMAOPS_K8S_SLACK_SECRET (default `dermaops-slack`): SLACK_BOT_TOKEN, optionally
           DERMAOPS_SLACK_CHANNEL, DERMAOPS_SLACK_API_URL;
- "source": Secret DERMAOPS_K8S_SOURCE_SECRET (default `dermaops-source`), optional (a public source needs
           none): DERMAOPS_SOURCE_TOKEN, optionally DERMAOPS_SOURCE_USER, DERMAOPS_SOURCE_HOST.

Scheduling, all from environment variables read when the DAG file is parsed (like DERMAOPS_RUNNER):

- DERMAOPS_K8S_NAMESPACE: the pods' namespace (unset: the provider's default, Airflow's own namespace in-cluster);
- DERMAOPS_K8S_NODE_SELECTOR: JSON object, every stage's pods; DERMAOPS_K8S_GPU_NODE_SELECTOR: JSON object
  merged over it for GPU stages (train, evaluate) when DERMAOPS_GPU=1;
- DERMAOPS_K8S_TOLERATIONS: JSON list of tolerations (Kubernetes field names), every stage's pods;
  DERMAOPS_K8S_GPU_TOLERATIONS: added for GPU stages (default: tolerate the `nvidia.com/gpu` taint that
  GPU node pools commonly carry);
- DERMAOPS_GPU=1 and DERMAOPS_K8S_GPUS (default 1): GPU stages get `nvidia.com/gpu: N` as a resource limit
  (train then runs one process per GPU it sees: `--nproc-per-node` defaults to the visible GPUs);
- DERMAOPS_K8S_SERVICE_ACCOUNT: the pods' service account (e.g. one bound to an IAM role for S3).

GPU stages get a memory-backed /dev/shm of the stage's shm size (PyTorch DataLoader workers pass batches
through it; a pod's default is 64 MiB). The stage's summary is its last JSON stdout line, read from the
pod's log before the pod is deleted, and a failed stage fails the task with its own one-line reason,
as in the other modes.
"""

from __future__ import annotations

import json
import os

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from kubernetes.client import models as k8s

from dermaops_runner.docker_mode import gpu_enabled
from dermaops_runner.results import StageResultMixin, drop_empty, error_line, summary_from_lines
from dermaops_runner.stages import StageSpec

SECRET_ENV = {
    "s3": ("DERMAOPS_K8S_S3_SECRET", "dermaops-s3-{role}"),
    "slack": ("DERMAOPS_K8S_SLACK_SECRET", "dermaops-slack"),
    "source": ("DERMAOPS_K8S_SOURCE_SECRET", "dermaops-source"),
}
OPTIONAL_SECRETS = ("source",)  # the pod starts without them (the provider's Secret cannot say so: env_from)
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def _json_env(name: str, kind: type, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'list'}, got {raw!r}")
    return value


def _tolerations(name: str, default: list) -> list[k8s.V1Toleration]:
    allowed = set(k8s.V1Toleration.attribute_map.values())
    out = []
    for item in _json_env(name, list, default):
        if not isinstance(item, dict) or not set(item) <= allowed:
            raise ValueError(f"{name}: {item!r} is not a toleration (fields: {', '.join(sorted(allowed))})")
        # attribute_map is python name -> Kubernetes name; the constructor wants the python names.
        python_names = {v: k for k, v in k8s.V1Toleration.attribute_map.items()}
        out.append(k8s.V1Toleration(**{python_names[k]: v for k, v in item.items()}))
    return out


def _gpu_count() -> str:
    raw = os.environ.get("DERMAOPS_K8S_GPUS", "1").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"DERMAOPS_K8S_GPUS must be a positive integer, got {raw!r}")
    return raw


def _secret_name(name: str, s3_role: str) -> str:
    if name not in SECRET_ENV:
        raise ValueError(f"unknown secret set {name!r} (known: {', '.join(SECRET_ENV)})")
    env, default = SECRET_ENV[name]
    return os.environ.get(env, "").strip() or default.format(role=s3_role)


def secret_refs(sets: tuple[str, ...], s3_role: str) -> list[Secret]:
    # No key: the whole Secret.
    return [Secret("env", None, _secret_name(name, s3_role)) for name in sets if name not in OPTIONAL_SECRETS]


def optional_secret_refs(sets: tuple[str, ...], s3_role: str) -> list[k8s.V1EnvFromSource]:
    return [
        k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=_secret_name(name, s3_role), optional=True))
        for name in sets
        if name in OPTIONAL_SECRETS
    ]


def pod_settings(spec: StageSpec) -> dict:
    """The KubernetesPodOperator arguments that come from configuration, for one stage."""
    gpu = spec.gpu and gpu_enabled()
    node_selector = _json_env("DERMAOPS_K8S_NODE_SELECTOR", dict, {})
    tolerations = _tolerations("DERMAOPS_K8S_TOLERATIONS", [])
    resources = None
    if gpu:
        node_selector = {**node_selector, **_json_env("DERMAOPS_K8S_GPU_NODE_SELECTOR", dict, {})}
        tolerations += _tolerations("DERMAOPS_K8S_GPU_TOLERATIONS", DEFAULT_GPU_TOLERATIONS)
        resources = k8s.V1ResourceRequirements(limits={GPU_RESOURCE: _gpu_count()})
    volumes, mounts = [], []
    if spec.shm_size:
        shm = k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=str(spec.shm_size))
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=shm))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    return {
        "namespace": os.environ.get("DERMAOPS_K8S_NAMESPACE", "").strip() or None,
        "node_selector": {str(k): str(v) for k, v in node_selector.items()} or None,
        "tolerations": tolerations or None,
        "container_resources": resources,
        "volumes": volumes,
        "volume_mounts": mounts,
        "service_account_name": os.environ.get("DERMAOPS_K8S_SERVICE_ACCOUNT", "").strip() or None,
    }


class KubernetesStageOperator(StageResultMixin, KubernetesPodOperator):
    ui_color = "#eef0fb"

    def __init__(self, *, spec: StageSpec, argv: list[str], secrets: tuple[str, ...], **kwargs):
        super().__init__(
            image=spec.image,
            arguments=["python", "-m", "dermaops", spec.stage, *argv],
            env_vars={"PYTHONUNBUFFERED": "1"},
            secrets=secret_refs(secrets, spec.s3_role),
            env_from=optional_secret_refs(secrets, spec.s3_role) or None,
            name=f"dermaops-{spec.stage.replace('_', '-')}",
            labels={"app.kubernetes.io/name": "dermaops", "dermaops/stage": spec.stage},
            get_logs=True,
            # The summary is read from the pod's log (cleanup below), not through the provider's XCom
            # sidecar, so the stage writes nothing Kubernetes-specific; execute() returns it as the XCom.
            do_xcom_push=False,
            **pod_settings(spec),
            **kwargs,
        )
        self.spec = spec
        self._stage_lines: list[str] = []
        self._stage_exit: int | None = None

    def cleanup(self, pod, remote_pod, xcom_result=None, context=None) -> None:
        # Runs after the stage's container ended and before the pod is deleted: the last chance to read its log.
        if remote_pod is not None and getattr(remote_pod, "metadata", None) is not None:
            try:
                text = self.client.read_namespaced_pod_log(
                    name=remote_pod.metadata.name,
                    namespace=remote_pod.metadata.namespace,
                    container=self.base_container_name,
                )
                self._stage_lines = text.splitlines()
            except Exception as exc:  # the failure below still names the stage; the log is in the task log
                self.log.warning("could not read the log of pod %s: %s", remote_pod.metadata.name, exc)
            self._stage_exit = _exit_code(remote_pod, self.base_container_name)
        super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)

    def execute(self, context):
        self.arguments = drop_empty(self.arguments)
        try:
            super().execute(context)
        except Exception as exc:
            if not self._stage_exit:  # the stage did not fail: the pod never ran it (scheduling, image pull, API)
                raise
            self.stage_failed(context, self.spec.stage, self._stage_exit, error_line(self._stage_lines) or str(exc))
        summary = self.stage_succeeded(context, summary_from_lines(self.spec.stage, self._stage_lines))
        self.do_xcom_push = True  # the pod is gone: from here the flag only tells the task runner to push the summary
        return summary


def _exit_code(remote_pod, container: str) -> int | None:
    for status in (getattr(remote_pod.status, "container_statuses", None) or []) if remote_pod.status else []:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None
