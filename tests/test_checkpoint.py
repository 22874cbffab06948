"""The checkpoint contract (dermaops.checkpoint) and the Predictor (dermaops.predictor), on a tiny untrained
network built here: fast, no training, no S3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dermaops.checkpoint import CHECKPOINT_VERSION, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from dermaops.dataset import CLASSES
from dermaops.errors import StageError
from dermaops.frame import Frame
from dermaops.models import build_model
from dermaops.predictor import Predictor

SIZE = 16
MEL = CLASSES.index("mel")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), SIZE).eval()
    meta = CheckpointMeta.for_model("resnet18", CLASSES, Frame("squash", SIZE), "auto", "none", phase=2, epoch=4)
    return model, meta


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_round_trip_keeps_every_field_and_the_weights(tiny, tmp_path):
    model, meta = tiny
    fitted = meta.replace(
        val={"macro_f1": 0.5},
        fingerprint="f" * 64,
        logit_bias=[0.1] * 7,  # a list, as the fits return it: stored and read back as the same tuple
        temperature=1.5,
        mel_threshold=0.25,
        referral={"threshold": 0.4},
        ood={"threshold": 3.0, "means": [[0.0]], "precision": [[1.0]]},
        train_prior=[1 / 7] * 7,
    )
    path = save_checkpoint(tmp_path / "cnn.pt", model, fitted)
    loaded_model, loaded = load_checkpoint(path)
    assert loaded == fitted and loaded.version == CHECKPOINT_VERSION and read_meta(path) == fitted
    assert loaded.logit_bias == (0.1,) * 7 and loaded.frame == Frame("squash", SIZE) and not loaded_model.training
    own, back = model.state_dict(), loaded_model.state_dict()
    assert all(torch.equal(own[k], back[k]) for k in own)
    stored = torch.load(path, weights_only=True)["meta"]  # plain types: loads with weights_only
    assert stored["version"] == CHECKPOINT_VERSION and stored["input_shape"] == [SIZE, SIZE]
    # The JSON record drops the detector's matrices and reads back.
    record = fitted.record()
    assert "means" not in record["ood"] and CheckpointMeta.from_dict(record, "record").ood == {"threshold": 3.0}


def test_a_checkpoint_written_before_the_version_field_loads_as_version_1(tiny, tmp_path):
    model, meta = tiny
    legacy = {k: v for k, v in meta.to_dict().items() if k != "version"}
    path = tmp_path / "legacy.pt"
    torch.save({"model_state": model.state_dict(), "meta": legacy}, path)
    assert load_checkpoint(path)[1] == meta


@pytest.mark.parametrize("version, word", [(2, "newer"), (0, "another")])
def test_another_version_is_refused_in_one_line_naming_it(tiny, tmp_path, version, word):
    model, meta = tiny
    path = tmp_path / "other.pt"
    torch.save({"model_state": model.state_dict(), "meta": {**meta.to_dict(), "version": version}}, path)
    with pytest.raises(StageError) as excinfo:
        load_checkpoint(path)
    message = _one_line_error(excinfo)
    assert str(path) in message and f"version {version} checkpoint, {word} than the version 1" in message


def test_foreign_files_and_missing_fields_are_refused_in_one_line(tiny, tmp_path):
    model, meta = tiny
    bare = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), bare)
    text = tmp_path / "notes.pt"
    text.write_text("not a torch file\n")
    missing = tmp_path / "missing.pt"
    torch.save({"model_state": model.state_dict(), "meta": {k: v for k, v in meta.to_dict().items() if k != "mean"}},
               missing)  # fmt: skip
    unknown = tmp_path / "unknown.pt"
    torch.save({"model_state": model.state_dict(), "meta": {**meta.to_dict(), "colour": "red"}}, unknown)
    expected = {
        bare: "no model_state and meta",
        text: "not a readable torch file",
        missing: "its meta lacks mean",
        unknown: "unknown checkpoint meta field(s) colour",
    }
    for path, what in expected.items():
        with pytest.raises(StageError) as excinfo:
            load_checkpoint(path)
        message = _one_line_error(excinfo)
        assert str(path) in message and what in message, message
    bad_temperature = tmp_path / "bad_temperature.pt"
    torch.save({"model_state": model.state_dict(), "meta": {**meta.to_dict(), "temperature": -1.0}}, bad_temperature)
    with pytest.raises(StageError, match="temperature is -1.0; it must be a finite number > 0"):
        read_meta(bad_temperature)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def test_predictor_applies_adjustment_then_temperature_then_the_decision_rule(tiny, tmp_path):
    model, meta = tiny
    bias = np.linspace(-1.0, 1.0, len(CLASSES))
    fitted = meta.replace(logit_bias=bias.tolist(), temperature=2.5, mel_threshold=0.15)
    predictor = Predictor.load(save_checkpoint(tmp_path / "cnn.pt", model, fitted), classes=CLASSES)
    images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)

    softmax = predictor.softmax(images, tta=True)
    by_hand = _softmax((np.log(softmax.astype(np.float64)) + bias) / 2.5)  # adjusted, then tempered
    assert np.allclose(predictor.predict(images, tta=True), by_hand, atol=1e-5)
    other_order = _softmax(np.log(softmax.astype(np.float64)) / 2.5 + bias)
    assert not np.allclose(by_hand, other_order, atol=1e-3)  # the order matters, so the check above pins it
    assert np.allclose(predictor.calibrate(softmax, temperature=False), _softmax(np.log(softmax) + bias), atol=1e-5)
    assert np.allclose(predictor.calibrate(softmax, adjust=False), _softmax(np.log(softmax) / 2.5), atol=1e-5)

    proba = predictor.calibrate(softmax)
    assert predictor.point.rule == "p(mel) >= 0.1500 (mel_threshold from checkpoint meta)"
    assert (predictor.flags(proba, MEL) == (by_hand[:, MEL] >= 0.15)).all()
    # champion.json's threshold comes first; without any, melanoma is flagged when it is the argmax.
    assert Predictor.load(tmp_path / "cnn.pt", champion={"mel_threshold": 0.5}).point.source == "champion.json"
    plain = Predictor(model, meta)
    assert plain.point.threshold is None and (plain.flags(proba, MEL) == (proba.argmax(axis=1) == MEL)).all()
    with pytest.raises(StageError, match=r"predicts classes \['akiec', .*expected \['a', 'b'\]"):
        Predictor.load(tmp_path / "cnn.pt", classes=["a", "b"])
