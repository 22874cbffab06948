"""Image geometry (dermaops.frame), its decoding and masks, the augmentations and test-time views that keep a
4:3 frame's shape, Grad-CAM judged against masks, and the non-ResNet architectures: unit tests on the real
full-resolution sample and 200 px packs, no stage processes."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from dermaops.augment import AugmentConfig, PolicyAugment, geometric
from dermaops.checkpoint import CheckpointMeta
from dermaops.errors import StageError
from dermaops.frame import Frame
from dermaops.gradcam import Localization, energy_ratios, pointing_hits
from dermaops.imagecache import decode_full, decode_image, decode_mask, rows_per_shard
from dermaops.models import build_model, head_name, predict_proba, stage_names, symmetry_views
from dermaops.scoring import dihedral_views_uint8

from tests.support.data import PACK_200PX, PACK_SAMPLE

OFF = AugmentConfig(max_rotation_deg=0, max_zoom=0, max_shift=0, brightness=0, contrast=0, saturation=0, hue=0)


def _members(pack, n: int, suffix: str = ".jpg") -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(pack / "HAM10000_images_part_1.zip") as zf:
        names = sorted(name for name in zf.namelist() if name.endswith(suffix))[:n]
        return [(name, zf.read(name)) for name in names]


def _mask(image_name: str) -> bytes:
    with zipfile.ZipFile(PACK_200PX / "HAM10000_segmentations_lesion.zip") as zf:
        return zf.read(image_name.replace(".jpg", "_segmentation.png"))


def test_frames_keep_what_their_geometry_says():
    assert Frame("squash", 64).shape == (64, 64) and Frame("squash", 64).name == "64"  # the old cache layout
    assert Frame("aspect", 200).shape == (150, 200) and Frame("aspect", 128).name == "aspect-128"
    assert Frame("crop", 96).shape == (96, 96)
    # 600x450: squash keeps it all, crop its centre square, aspect all of it (it is 4:3 already).
    assert Frame("squash", 64).box(600, 450) == (0, 0, 600, 450)
    assert Frame("crop", 64).box(600, 450) == (75, 0, 525, 450)
    assert Frame("aspect", 64).box(600, 450) == (0, 0, 600, 450)
    # A picture of another shape is cut to the geometry's shape, centred.
    assert Frame("aspect", 64).box(800, 450) == (100, 0, 700, 450)
    assert Frame("aspect", 64).box(600, 600) == (0, 75, 600, 525)
    assert Frame.of(28) == Frame("squash", 28) and Frame.from_meta({"image_size": 28}) == Frame("squash", 28)
    assert rows_per_shard(Frame("aspect", 200)) == 64 * 2**20 // (150 * 200 * 3)
    with pytest.raises(StageError, match="unknown image geometry 'wide'"):
        Frame("wide", 64)
    with pytest.raises(StageError, match="image size 4 is out of range"):
        Frame("squash", 4)


@pytest.mark.parametrize("frame", [Frame("squash", 224), Frame("aspect", 200), Frame("crop", 128)])
def test_draft_decoding_of_full_resolution_originals_matches_a_full_decode(frame):
    """JPEG draft mode (DCT scaling) on the 600x450 originals stays within 35 dB of decoding every pixel."""
    for _, data in _members(PACK_SAMPLE, 6):
        draft, full = decode_image(data, frame), decode_full(data, frame)
        assert draft.shape == full.shape == (*frame.shape, 3)
        mse = float(((draft.astype(float) - full) ** 2).mean())
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35


def test_a_full_resolution_source_gives_the_pixels_of_the_200px_pack():
    """The 200 px pack is the 600x450 originals resized: through the same frame both give the same input, so a
    model trained on the pack reads the Dataverse originals correctly (mean error 1.5-4 grey levels, the
    pack's JPEG compression; a wrong image gives tens)."""
    originals = dict(_members(PACK_SAMPLE, 6))
    with zipfile.ZipFile(PACK_200PX / "HAM10000_images_part_1.zip") as zf:
        for frame in (Frame("aspect", 128), Frame("crop", 96), Frame("squash", 64)):
            errors = [np.abs(decode_image(zf.read(n), frame).astype(float) - decode_image(d, frame)).mean()
                      for n, d in originals.items()]  # fmt: skip
            assert max(errors) < 5.0, (frame, errors)
            first, second = list(originals)[:2]
            wrong = decode_image(zf.read(first), frame).astype(float) - decode_image(originals[second], frame)
            assert np.abs(wrong).mean() > 10


def test_masks_follow_their_image_through_every_geometry():
    name, data = _members(PACK_SAMPLE, 1)[0]
    mask_png = _mask(name)
    for frame in (Frame("squash", 64), Frame("aspect", 128), Frame("crop", 96)):
        mask = decode_mask(mask_png, frame)
        assert mask.shape == frame.shape and mask.dtype == bool and 0 < mask.mean() < 1
    # crop = the centre of aspect: the crop's mask equals the middle columns of the whole-picture mask.
    whole = decode_mask(mask_png, Frame("aspect", 400))  # 300x400
    centre = decode_mask(mask_png, Frame("crop", 300))
    assert (whole[:, 50:350] == centre).mean() > 0.99
    # The lesion is darker than the skin around it: the mask lands on the lesion, not beside it.
    image = decode_image(data, Frame("aspect", 128)).astype(float).mean(axis=2)
    mask = decode_mask(mask_png, Frame("aspect", 128))
    assert image[mask].mean() < image[~mask].mean()


def test_augmentation_of_a_4_3_frame_keeps_its_shape_and_uses_the_rectangles_symmetries():
    x = torch.rand(64, 3, 6, 8)
    y = geometric(x, OFF, torch.Generator().manual_seed(3))
    used = set()
    for i in range(len(x)):
        candidates = [x[i], x[i].flip(2), x[i].flip(1), x[i].flip(1).flip(2)]  # identity, mirrors, half turn
        errors = [float((y[i] - c).abs().max()) for c in candidates]
        assert min(errors) < 1e-5
        used.add(errors.index(min(errors)))
    assert used == {0, 1, 2, 3}
    # A small free rotation turns pixels, not normalised coordinates: a centred disk stays a disk.
    yy, xx = np.mgrid[:60, :80]
    disk = torch.from_numpy(((yy - 29.5) ** 2 + (xx - 39.5) ** 2 <= 15**2).astype(np.float32)).expand(8, 3, 60, 80)
    free = AugmentConfig(max_rotation_deg=45, max_zoom=0, max_shift=0)
    turned = geometric(disk.contiguous(), free, torch.Generator())
    assert torch.allclose(turned.sum(dim=(2, 3)), disk.sum(dim=(2, 3)), rtol=0.03)
    assert float((turned - disk).abs().mean()) < 0.01


def test_tta_of_a_4_3_frame_averages_its_four_views():
    assert symmetry_views((48, 64)) == (0, 2, 4, 6) and symmetry_views((64, 64)) == tuple(range(8))
    frame = Frame("aspect", 64)
    meta = CheckpointMeta.for_model("resnet18", "abcdefg", frame, "auto", "none")
    assert meta.input_shape == (48, 64) and meta.to_dict()["input_shape"] == [48, 64] and meta.geometry == "aspect"
    torch.manual_seed(0)
    model = build_model("resnet18", 7, min(frame.shape)).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(5, 48, 64, 3), dtype=np.uint8)
    views = [predict_proba(model, dihedral_views_uint8(images, k), meta) for k in symmetry_views(frame.shape)]
    assert all(v.shape == (5, 7) for v in views)
    assert np.allclose(np.mean(views, axis=0), predict_proba(model, images, meta, tta=True), atol=1e-6)
    with pytest.raises(StageError, match=r"the model expects \(N, 48, 64, 3\)"):
        predict_proba(model, images[:, :, :48], meta)


def test_energy_ratio_and_pointing_game_against_a_mask():
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:20] = True  # 100 of 1,600 pixels
    on = mask.astype(float)
    uniform = np.ones((40, 40))
    rim = np.zeros((40, 40))
    rim[20, 15] = 1.0  # one pixel outside the lesion: within the 1 px tolerance of a 40 px frame
    far = np.zeros((40, 40))
    far[35, 35] = 1.0
    maps = np.stack([on, uniform, rim, far, np.zeros((40, 40))])
    masks = np.stack([mask] * 5)
    ratios = energy_ratios(maps, masks)
    assert ratios[0] == pytest.approx(16.0) and ratios[1] == pytest.approx(1.0) and ratios[3] == 0
    assert np.isnan(ratios[4])  # no mass: undefined
    # The uniform map's maximum is its first pixel (0, 0), off the lesion; a map without mass points nowhere.
    assert pointing_hits(maps, masks).tolist() == [True, False, True, False, False]
    found = Localization.of(maps, masks)
    summary = found.summary(np.array([0, 3]))
    assert summary["n"] == 2 and summary["pointing_hit_rate"] == 0.5 and summary["energy_ratio"] == pytest.approx(8.0)


def test_non_resnet_architectures_have_a_head_and_stages_and_freeze_by_them():
    from dermaops.config import TrainConfig
    from dermaops.training import _learns, trainable_modules

    model = build_model("mobilenet_v3_small", 7, 64)
    assert head_name(model) == "classifier.3" and model.classifier[3].out_features == 7
    stages = stage_names(model)
    assert len(stages) >= 4 and stages[-1][-1] == "features.12"
    learn = trainable_modules(model, TrainConfig(arch="mobilenet_v3_small", finetune_depth=1), 2)
    assert learn == ("classifier", *stages[-1])
    assert _learns("classifier.0.weight", learn) and not _learns("features.1.block.0.0.weight", learn)
    assert trainable_modules(model, TrainConfig(arch="mobilenet_v3_small"), 1) is None  # from scratch: all
    with torch.inference_mode():
        assert model.eval()(torch.rand(2, 3, 48, 64)).shape == (2, 7)
    with pytest.raises(StageError, match="--stem small applies to ResNets only"):
        build_model("mobilenet_v3_small", 7, 64, stem="small")


def test_the_augmentation_policy_is_per_image_and_repeatable_per_batch():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(8, 24, 32, 3), dtype=np.uint8))
    policy = PolicyAugment("trivial")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = policy(images, seed=5)
    assert torch.equal(torch.rand(3), before)  # the policy's draws leave the global generator where it was
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, PolicyAugment("trivial")(images, seed=5))  # same batch seed: same ops (resumable)
    changed = [not torch.equal(a, b) for a, b in zip(first, images, strict=True)]
    assert sum(changed) >= 2  # per image (an identity op or a zero strength may leave one as it was)
    assert not torch.equal(first, policy(images, seed=6))
    with pytest.raises(ValueError, match="unknown augmentation policy 'auto'"):
        PolicyAugment("auto")
