"""The `train` stage on real 28 px images and the loopback S3: learning, outputs, resume, skip, errors.

Configs are tiny (resnet18 at 32 px with the ImageNet stem, a few hundred training images, one
torch thread) so the whole file stays around a minute or two on two shared cores.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from dermaops.augment import AugmentConfig, colour_jitter, geometric, mix_batch
from dermaops.calibration import fit_logit_adjustment
from dermaops.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from dermaops.models import build_model, dihedral_view, head_name, predict_proba, stage_names, to_input
from dermaops.predictor import Predictor
from dermaops.store import S3Uri
from dermaops.training import EpochRecord, TrainState

TINY = [
    "--arch", "resnet18", "--image-size", "32", "--stem", "imagenet", "--batch-size", "32",
    "--max-train-images", "480", "--num-threads", "1", "--lr", "1e-3", "--finetune-lr", "1e-4",
    "--no-class-weights", "--patience", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def split_uri(small_split) -> str:
    """A lesion-grouped split of the small real pack (about 90 images per class, made by the real ingest and
    split stages): 480 training images are drawn from its ~500, and its ~70 validation images keep the
    per-epoch validation and the post-hoc fits (8-view TTA) to seconds instead of the minute they took on the
    whole 28 px pack's 1,002."""
    return small_split["split_uri"]


def test_training_learns_writes_outputs_and_skips_when_finished(run_stage, split_uri, bucket, store, tmp_path):
    out = f"s3://{bucket.bucket}/runs/r1/models/cnn"
    argv = ["train", "--split", split_uri, "--out", out, *TINY, "--epochs", "3", "--finetune-epochs", "1"]
    result = run_stage(*argv)
    summary = result.summary
    assert summary["status"] == "done" and summary["resumed"] is False
    assert summary["epochs_run"] == 4 and summary["n_train"] == 480 and summary["device"] == "cpu"

    history = store.get_json(summary["history_uri"])
    assert [(row["phase"], row["epoch"]) for row in history] == [(1, 1), (1, 2), (1, 3), (2, 4)]
    val_losses = [row["val_loss"] for row in history]
    assert min(val_losses[1:]) < val_losses[0], f"validation loss did not improve: {val_losses}"
    assert max(row["val_macro_f1"] for row in history) == pytest.approx(summary["best_val_macro_f1"], abs=1e-4)

    manifest = store.get_json(S3Uri.parse(out).join("manifest.json"))
    for name in ("cnn.pt", "cnn_phase1.pt", "history.json", "checkpoints/last.pt", *CURVES):
        assert name in manifest["files"], name
        assert store.exists(S3Uri.parse(out).join(name))

    # The best checkpoint is a self-describing model: rebuilt, it predicts probabilities.
    model, meta = load_checkpoint(store.download(summary["model_uri"], tmp_path / "cnn.pt"))
    assert meta.arch == "resnet18" and meta.image_size == 32 and meta.epoch == summary["best_epoch"]
    assert meta.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    proba = predict_proba(model, images, meta)
    assert proba.shape == (5, 7) and np.allclose(proba.sum(1), 1.0, atol=1e-5)
    _, phase1_meta = load_checkpoint(store.download(summary["phase1_model_uri"], tmp_path / "p1.pt"))
    assert phase1_meta.phase == 1

    again = run_stage(*argv)
    assert again.summary["status"] == "skipped"
    assert again.summary["model_uri"] == summary["model_uri"]
    assert store.get_json(S3Uri.parse(out).join("manifest.json"))["created_at"] == manifest["created_at"]


CURVES = ("curves_loss.png", "curves_accuracy.png", "curves_f1.png")


def test_killed_training_resumes_from_its_last_checkpoint(run_stage, stage_env, split_uri, bucket, store, tmp_path):
    out = f"s3://{bucket.bucket}/runs/r2/models/cnn"
    argv = ["train", "--split", split_uri, "--out", out, *TINY, "--epochs", "3", "--finetune-epochs", "1"]
    checkpoint = S3Uri.parse(out).join("checkpoints/last.pt")
    env = {**stage_env, "DERMAOPS_SCRATCH_DIR": str(tmp_path / "scratch")}
    proc = subprocess.Popen([sys.executable, "-m", "dermaops", *argv], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not store.exists(checkpoint):
        assert proc.poll() is None, f"train ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash: no cleanup, no chance to publish
    first_log = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL
    assert not store.exists(S3Uri.parse(out).join("manifest.json"))
    epochs_before = first_log.count("done: train loss")
    assert 1 <= epochs_before < 4

    result = run_stage(*argv)
    assert f"resuming from epoch {epochs_before + 1}" in result.stderr
    assert result.stderr.count("done: train loss") == 4 - epochs_before
    summary = result.summary
    assert summary["resumed"] is True and summary["epochs_run"] == 4
    history = store.get_json(summary["history_uri"])
    assert [(row["phase"], row["epoch"]) for row in history] == [(1, 1), (1, 2), (1, 3), (2, 4)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "-1"], "--epochs must be 0..500, got -1"),
        (["--arch", "resnet999"], "invalid choice: 'resnet999'"),
        (["--finetune-depth", "7"], "--finetune-depth must be 1..4"),
        (["--pretrained", "/nowhere/weights.pt"], "--pretrained '/nowhere/weights.pt': no such file"),
        (["--pretrained", "imagenet"], "ImageNet weights for resnet50 are not in the torch hub cache"),
    ],
)
def test_bad_flags_fail_with_one_line_and_write_nothing(run_stage, split_uri, bucket, store, tmp_path, flags, message):
    out = f"s3://{bucket.bucket}/runs/bad/models/cnn"
    # An empty torch hub cache, as in an image that did not bake the ImageNet weights in.
    env = {"TORCH_HOME": str(tmp_path / "torch-home")}
    result = run_stage("train", "--split", split_uri, "--out", out, *flags, check=False, env=env)
    assert result.returncode == 2
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert message in result.error_line
    assert list(store.list(S3Uri.parse(out))) == []


def test_missing_split_is_named(run_stage, bucket, store):
    missing = f"s3://{bucket.bucket}/runs/nothing/split"
    result = run_stage("train", "--split", missing, "--out", f"s3://{bucket.bucket}/runs/x/cnn", check=False)
    assert result.returncode == 2
    assert result.error_line == (
        f"dermaops train: error: no finished split at {missing}: manifest.json is missing "
        "(did the producing stage finish?)"
    )
    assert list(store.list(bucket)) == []


def test_small_inputs_get_the_small_stem_and_checkpoints_round_trip(tmp_path):
    small = build_model("resnet18", 7, 28)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    large = build_model("resnet34", 7, 64)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    assert stage_names(large)[-1] == ("layer4",) and head_name(large) == "fc"
    compact = build_model("resnet18", 7, 28, stem="compact")  # 3x3 stride 1, then the max-pool: 14x14 to layer1
    assert compact.conv1.kernel_size == (3, 3) and isinstance(compact.maxpool, torch.nn.MaxPool2d)
    with torch.inference_mode():
        assert compact.layer1(compact.maxpool(compact.conv1(torch.rand(1, 3, 28, 28)))).shape[-2:] == (14, 14)
    meta = CheckpointMeta(arch="resnet18", classes=list("abcdefg"), image_size=28, stem="small", mean=[0.5] * 3,
                          std=[0.25] * 3, phase=1, epoch=1, val={})  # fmt: skip
    model, loaded_meta = load_checkpoint(save_checkpoint(tmp_path / "m.pt", small, meta))
    assert loaded_meta == meta
    x = torch.rand(2, 3, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model(x), small.eval()(x))


def test_pretrained_weights_from_a_checkpoint_file_are_loaded(tmp_path):
    source = build_model("resnet18", 7, 64)
    meta = CheckpointMeta.for_model("resnet18", list("abcdefg"), 64, "imagenet", "none")
    path = save_checkpoint(tmp_path / "src.pt", source, meta)
    # Different head size: the backbone is copied, the new head starts fresh.
    target = build_model("resnet18", 3, 64, pretrained=str(path))
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert target.fc.out_features == 3


def test_augmentation_keeps_lesions_intact():
    x = torch.rand(64, 3, 9, 9)
    rng = torch.Generator().manual_seed(1)
    off = AugmentConfig(max_rotation_deg=0, max_zoom=0, max_shift=0, brightness=0, contrast=0, saturation=0, hue=0)
    # Without free rotation, each image becomes exactly one of the 8 symmetries of the square.
    y = geometric(x, off, rng)
    used = set()
    for i in range(len(x)):
        turns = [torch.rot90(x[i], k, (1, 2)) for k in range(4)]
        candidates = [t for turn in turns for t in (turn, turn.flip(2))]
        errors = [float((y[i] - c).abs().max()) for c in candidates]
        assert min(errors) < 1e-5
        used.add(errors.index(min(errors)))
    assert used == set(range(8))
    assert torch.allclose(colour_jitter(x, off, rng), x, atol=1e-6)
    jittered = colour_jitter(x, AugmentConfig(), rng)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, x, atol=1e-3)


def test_mixup_and_cutmix_pair_each_image_with_the_previous_one_and_return_the_label_weight():
    x = torch.rand(6, 3, 16, 16)
    rolled = x.roll(1, 0)
    assert mix_batch(x, 0.0, 0.0, np.random.default_rng(0)) == (x, 1.0)  # both off: the batch untouched
    mixed, lam = mix_batch(x, 0.2, 0.0, np.random.default_rng(0))
    assert 0 < lam < 1 and torch.allclose(mixed, lam * x + (1 - lam) * rolled)
    for seed in range(20):  # CutMix: each pixel is the image's own or its partner's; lam = the own share
        cut, lam = mix_batch(x, 0.0, 1.0, np.random.default_rng(seed))
        own = (cut == x).all(1)  # (N, H, W)
        assert torch.equal(cut, torch.where(own.unsqueeze(1), x, rolled))
        assert lam == pytest.approx(float(own[0].float().mean()))
        assert (own == own[0]).all()  # one box for the whole batch
    picked = {mix_batch(x, 0.2, 1.0, np.random.default_rng(seed))[0].eq(x).any().item() for seed in range(20)}
    assert picked == {True, False}  # both on: some batches cut (pixels kept), some blended (none kept)


def test_test_time_augmentation_is_the_mean_softmax_over_the_8_views_and_the_bias_is_applied():
    torch.manual_seed(0)
    model = build_model("resnet18", 7, 16, stem="small").eval()
    meta = CheckpointMeta(arch="resnet18", classes=list("abcdefg"), image_size=16, stem="small", mean=[0.5] * 3,
                          std=[0.25] * 3)  # fmt: skip
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    x = to_input(torch.from_numpy(images), meta)
    views = [dihedral_view(x, k) for k in range(8)]
    assert len({v.numpy().tobytes() for v in views}) == 8 and torch.equal(views[0], x)
    with torch.inference_mode():
        per_view = torch.stack([torch.softmax(model(v), 1) for v in views]).numpy()
    tta = predict_proba(model, images, meta, tta=True)
    assert np.allclose(tta, per_view.mean(0), atol=1e-5)
    assert np.allclose(predict_proba(model, images, meta), per_view[0], atol=1e-5)
    assert not np.allclose(tta, per_view[0], atol=1e-4)

    bias = np.linspace(-1, 1, 7)
    adjusting = Predictor(model, meta.replace(logit_bias=bias.tolist()))
    expected = np.exp(np.log(per_view.mean(0)) + bias)
    assert np.allclose(adjusting.predict(images, tta=True), expected / expected.sum(1, keepdims=True), atol=1e-5)
    assert np.allclose(adjusting.softmax(images, tta=True), tta)


def test_logit_adjustment_recovers_an_under_predicted_rare_class():
    rng = np.random.default_rng(0)
    classes = ["common", "rare"]
    train_labels = np.array([0] * 900 + [1] * 100)
    y = np.array([0] * 300 + [1] * 30)
    # A prior-biased model: the rare class's probability is shrunk, so argmax almost never picks it.
    p_rare = np.where(y == 1, rng.uniform(0.2, 0.45, len(y)), rng.uniform(0.0, 0.25, len(y)))
    proba = np.stack([1 - p_rare, p_rare], 1)
    fitted = fit_logit_adjustment(proba, y, train_labels, classes)
    adj = fitted["logit_adjustment"]
    assert adj["fitted_on"] == "val" and adj["tau"] > 0
    assert adj["val_macro_f1_after"] > adj["val_macro_f1_before"] + 0.2
    # An already balanced model keeps tau 0 (the tie-break prefers no adjustment).
    perfect = np.eye(2)[y] * 0.8 + 0.1
    assert fit_logit_adjustment(perfect, y, train_labels, classes)["logit_adjustment"]["tau"] == 0.0


def test_the_logit_adjusted_loss_learns_the_balanced_posterior_and_plain_cross_entropy_the_prior(tmp_path):
    """Fitting constant logits to imbalanced labels: plain cross-entropy ends at the class frequencies,
    the logit-adjusted loss (tau 1) at equal probabilities, i.e. the posterior without the training prior."""
    from dermaops.config import TrainConfig
    from dermaops.training import Split, Trainer

    classes = ["a", "b", "c"]
    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    images = torch.zeros((len(labels), 8, 8, 3), dtype=torch.uint8)
    fitted = {}
    for tau in (0.0, 1.0):
        cfg = TrainConfig(arch="resnet18", image_size=8, class_weights=False, loss_tau=tau)
        trainer = Trainer(
            cfg, classes, Split.in_memory(images, labels), Split.in_memory(images, labels), "cpu", tmp_path, {}, print
        )
        logits = torch.zeros(3, requires_grad=True)
        optimizer = torch.optim.SGD([logits], lr=1.0)
        for _ in range(500):
            optimizer.zero_grad()
            trainer.criterion(logits.expand(len(labels), 3), labels).backward()
            optimizer.step()
        fitted[tau] = torch.softmax(logits.detach(), 0).numpy()
    assert np.allclose(fitted[0.0], [0.80, 0.15, 0.05], atol=0.01)
    assert np.allclose(fitted[1.0], [1 / 3] * 3, atol=0.01)


def test_calibrate_fits_the_adjustment_on_validation_predictions(run_stage, split_uri, bucket, store, tmp_path):
    import pandas as pd

    out = f"s3://{bucket.bucket}/runs/calibrated/models/cnn"
    argv = ["train", "--split", split_uri, "--out", out, *TINY, "--epochs", "1", "--finetune-epochs", "0"]
    summary = run_stage(*argv, "--calibrate").summary
    model, meta = load_checkpoint(store.download(summary["model_uri"], tmp_path / "cnn.pt"))
    assert meta.logit_adjustment == summary["logit_adjustment"] and meta.logit_adjustment["fitted_on"] == "val"

    # Refitting from the unadjusted TTA predictions on val.csv gives the stored bias: val, not test, fixed it.
    split = S3Uri.parse(split_uri)
    frames = {n: pd.read_csv(store.download(split.join(f"{n}.csv"), tmp_path / f"{n}.csv")) for n in ("train", "val")}
    train = frames["train"].sample(n=480, random_state=42)
    cache = S3Uri.parse(meta.image_cache)
    ids = store.get_json(cache.join("image_ids.json"))
    shards = store.get_json(cache.join("manifest.json"))["summary"]["shards"]
    images = np.concatenate([np.load(store.download(cache.join(name), tmp_path / name)) for name, _ in shards])
    val_images = images[[ids.index(i) for i in frames["val"]["image_id"]]]
    raw = predict_proba(model, val_images, meta, tta=True)
    refit = fit_logit_adjustment(raw, frames["val"]["label"].to_numpy(), train["label"].to_numpy(), list(meta.classes))
    assert np.allclose(refit["logit_bias"], meta.logit_bias, atol=1e-6)
    assert refit["logit_adjustment"]["val_macro_f1_after"] == meta.logit_adjustment["val_macro_f1_after"]

    # The calibration hook: temperature and melanoma threshold refit from the adjusted TTA val probabilities
    # (what every consumer scores) are the stored ones, and the threshold reaches the default target on val.
    from dermaops.calibration import fit

    labels = frames["val"]["label"].to_numpy()
    adjusted = Predictor(model, meta).calibrate(raw, temperature=False)
    calibration = fit(adjusted, labels, meta.classes.index("mel"), 0.85)
    assert meta.temperature == pytest.approx(calibration["temperature"], rel=1e-6) and meta.temperature > 0
    assert meta.mel_threshold == pytest.approx(calibration["mel_threshold"], abs=1e-6)
    assert meta.calibration["val_mel_sensitivity"] >= 0.85 and meta.calibration["tta"] is True
    assert summary["temperature"] == round(meta.temperature, 4) and summary["calibration"] == meta.calibration


def test_weight_ema_averages_float_weights_copies_counters_and_round_trips():
    from dermaops.training import WeightEMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 5
    ema.update(model)  # first step: the decay ramps up from 1/10, so the average moves 90 % of the way
    assert torch.allclose(ema.module[0].weight, start["0.weight"] + 0.9)
    assert ema.module[1].num_batches_tracked.item() == 5  # a counter is copied, not averaged
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.module[0].weight, model[0].weight, atol=1e-4)
    assert not ema.module[0].weight.requires_grad
    restored = WeightEMA(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 201 and torch.equal(restored.module[0].weight, ema.module[0].weight)


def test_mixup_and_cutmix_train_through_the_stage(run_stage, split_uri, bucket, store, tmp_path):
    out = S3Uri.parse(f"s3://{bucket.bucket}/runs/mix/models/cnn")
    argv = ["train", "--split", split_uri, "--out", str(out), *TINY, "--epochs", "1", "--finetune-epochs", "0"]
    summary = run_stage(*argv, "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0").summary
    assert np.isfinite(summary["best_val_macro_f1"])
    last = torch.load(store.download(out.join("checkpoints/last.pt"), tmp_path / "last.pt"), weights_only=True)
    assert (last["config"]["mixup_alpha"], last["config"]["cutmix_alpha"]) == (0.2, 1.0)


def test_ema_decay_validates_and_checkpoints_the_averaged_weights(run_stage, split_uri, bucket, store, tmp_path):
    out = S3Uri.parse(f"s3://{bucket.bucket}/runs/ema/models/cnn")
    argv = ["train", "--split", split_uri, "--out", str(out), *TINY, "--epochs", "1", "--finetune-epochs", "0"]
    summary = run_stage(*argv, "--ema-decay", "0.9").summary
    last = torch.load(store.download(out.join("checkpoints/last.pt"), tmp_path / "last.pt"), weights_only=True)
    best = torch.load(store.download(summary["model_uri"], tmp_path / "cnn.pt"), weights_only=True)["model_state"]
    averaged, trained = last["ema_state"]["module"], last["model_state"]
    # The one epoch is the best: cnn.pt (what evaluate scores) holds the average, not the trained weights.
    assert all(torch.equal(best[k], averaged[k].cpu()) for k in best)
    assert any(not torch.equal(best[k], trained[k].cpu()) for k in best if best[k].is_floating_point())
    assert last["config"]["ema_decay"] == 0.9


def test_class_sampling_draws_rare_classes_more_often_and_repeats_per_epoch():
    from dermaops.training import ClassSampler

    labels = np.array([0] * 900 + [1] * 100)
    natural = ClassSampler(labels, 1.0, 1000, seed=3)
    assert sorted(natural) == list(range(1000))  # power 1, the split's size: every image once, shuffled
    balanced = ClassSampler(labels, 0.0, 4000, seed=3)
    balanced.set_epoch(2)
    drawn = labels[list(balanced)]
    assert len(drawn) == len(balanced) == 4000 and 0.45 < drawn.mean() < 0.55  # classes equally often
    sqrt = labels[list(ClassSampler(labels, 0.5, 4000, seed=3))]
    assert 0.2 < sqrt.mean() < 0.3  # sqrt(100) / (sqrt(900) + sqrt(100)) = 0.25
    again = ClassSampler(labels, 0.0, 4000, seed=3)
    again.set_epoch(2)
    assert list(again) == list(balanced)  # (seed, epoch) fixes the draw: a resumed epoch draws alike
    again.set_epoch(3)
    assert list(again) != list(balanced)
    ranks = [ClassSampler(labels, 0.0, 4000, seed=3, world=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(balanced)  # the ranks share one draw
    subset = ClassSampler(labels, 1.0, 300, seed=3)
    assert len(set(subset)) == 300  # fewer than the split: a fresh subset without repeats


def _row(phase: int, epoch: int, val_macro_f1: float) -> EpochRecord:
    return EpochRecord(phase, epoch, 1.0, 0.5, 0.5, 0.5, 100.0, 1.0, 0.5, 0.5, val_macro_f1, 1e-3, 1.0)


def test_the_phase_state_machine_keeps_the_bests_and_stops_early():
    """TrainState.record, without torch: the bests written as cnn.pt and cnn_phase1.pt, early stopping per
    phase, and the state a resumed run continues from (last.pt holds it as a plain dict)."""
    st = TrainState()
    assert st.wants(1, 5) and st.wants(2, 1) and not st.wants(2, 0)
    st.enter(1)
    outcomes = [st.record(_row(1, e, f1), patience=2, phase_epochs=5) for e, f1 in enumerate((0.2, 0.4, 0.3), 1)]
    assert [(o.best, o.best_phase1, o.stop) for o in outcomes] == [(True, True, False), (True, True, False),
                                                                   (False, False, False)]  # fmt: skip
    assert not st.phase_done and st.stale_epochs == 1
    resumed = TrainState.from_dict(st.to_dict())  # what last.pt gives back
    assert resumed == st and isinstance(resumed.history[0], EpochRecord)
    stop = resumed.record(_row(1, 4, 0.35), patience=2, phase_epochs=5)
    assert stop.stop and resumed.phase_done and not resumed.wants(1, 5)  # two epochs without a better val F1
    assert (resumed.best.epoch, resumed.best_phase1.epoch) == (2, 2)

    resumed.enter(2)  # phase 2: its own early stopping, the phase-1 best stays
    assert resumed.stale_epochs == 0 and resumed.phase_best is None
    better = resumed.record(_row(2, 5, 0.45), patience=2, phase_epochs=1)
    assert (better.best, better.best_phase1, better.stop) == (True, False, False) and resumed.phase_done
    assert (resumed.best.epoch, resumed.best.phase, resumed.best_phase1.epoch) == (5, 2, 2)
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4, 5]
    assert _row(2, 5, 0.45).val() == {"loss": 1.0, "acc": 0.5, "weighted_f1": 0.5, "macro_f1": 0.45}
