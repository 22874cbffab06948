"""The image cache on the real packs: built once as sha256-checked shards, published under the dataset,
reused after, read row by row or through a DataLoader with worker processes; draft-mode decoding."""

from __future__ import annotations

import io
import logging
import pickle
import zipfile

import numpy as np
import pytest
from dermaops import imagecache
from dermaops.dataset import Dataset
from dermaops.errors import StageError
from dermaops.imagecache import cache_uri, collate_batch, decode_full, decode_image, load_images, shard_name
from dermaops.stage import Context
from dermaops.store import ArtifactStore, S3Uri
from PIL import Image

# Sizes no other test asks for, so these tests see the cache being built.
SIZE = 17
SIZE_LEGACY = 19
SIZE_CORRUPT = 21
SHARD_ROWS = 3000  # small shards, so 10,015 images make 4 of them (the last one shorter)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(imagecache, "SHARD_BYTES", SHARD_ROWS * SIZE * SIZE * 3)


def _etag(store: ArtifactStore, uri: S3Uri) -> str:
    return store.client.head_object(Bucket=uri.bucket, Key=uri.key)["ETag"]


def test_cache_is_built_once_as_checked_shards_then_reused(dataset_28px, store, tmp_path, caplog, small_shards):
    caplog.set_level(logging.INFO, logger="dermaops.imagecache")
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path / "a")
    first = load_images(Context(store, tmp_path / "a"), dataset, SIZE)
    assert "building" in caplog.text
    assert len(first) == 10015 and sorted(first.ids) == sorted(dataset.metadata["image_id"])
    prefix = cache_uri(dataset, SIZE)
    manifest = store.get_json(prefix.join("manifest.json"))
    summary = manifest["summary"]
    assert summary["n_images"] == 10015 and summary["rows_per_shard"] == SHARD_ROWS
    assert summary["shards"] == [[shard_name(i), n] for i, n in enumerate((3000, 3000, 3000, 1015))]
    for name, rows in summary["shards"]:
        local = tmp_path / "a" / "imagecache" / dataset.version / str(SIZE) / name
        assert np.load(local, mmap_mode="r").shape == (rows, SIZE, SIZE, 3)
        assert manifest["files"][name]["sha256"] == imagecache.sha256_file(local)
        assert manifest["files"][name]["size"] == store.size(prefix.join(name))
    etag = _etag(store, prefix.join(shard_name(0)))

    # A fresh scratch directory (another container): downloads only the shards it reads, does not rebuild.
    caplog.clear()
    elsewhere = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path / "b")
    second = load_images(Context(store, tmp_path / "b"), elsewhere, SIZE)
    assert "reusing" in caplog.text and "building" not in caplog.text
    assert second.ids == first.ids
    shards_b = tmp_path / "b" / "imagecache" / dataset.version / str(SIZE) / "shards"
    assert not shards_b.exists() or not any(shards_b.iterdir())
    some = [first.ids[i] for i in (9000, 10014, 9500)]  # all in the last shard
    np.testing.assert_array_equal(second.rows(some), first.rows(some))
    assert sorted(p.name for p in shards_b.iterdir()) == ["00003.npy"]
    everything = first.ids[::-1]
    np.testing.assert_array_equal(second.rows(everything), first.rows(everything))
    assert _etag(store, prefix.join(shard_name(0))) == etag
    assert store.get_json(prefix.join("manifest.json"))["created_at"] == manifest["created_at"]


def test_rows_follow_the_requested_order_and_pixels_match_the_jpeg(dataset_28px, store, tmp_path):
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path)
    cached = load_images(Context(store, tmp_path), dataset, 28)  # the pack's native size: no resizing
    ids = ["ISIC_0029306", "ISIC_0024306", "ISIC_0034320", "ISIC_0029306"]
    rows = cached.rows(ids)
    assert rows.shape == (4, 28, 28, 3) and rows.dtype == np.uint8
    with zipfile.ZipFile(dataset.local("HAM10000_images_part_2.zip")) as zf:
        decoded = np.asarray(Image.open(io.BytesIO(zf.read("ISIC_0029306.jpg"))).convert("RGB"))
    np.testing.assert_array_equal(rows[0], decoded)
    np.testing.assert_array_equal(rows[3], decoded)
    assert not np.array_equal(rows[0], rows[1])
    with pytest.raises(StageError, match="2 image_ids are not in the image cache.*ISIC_9999998"):
        cached.rows(["ISIC_0024306", "ISIC_9999998", "ISIC_9999999"])


def test_dataloader_workers_read_the_shards_lazily(dataset_28px, store, tmp_path, small_shards):
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path)
    cached = load_images(Context(store, tmp_path), dataset, SIZE)
    meta = dataset.metadata.set_index("image_id")
    ids = meta.index[::7].tolist()  # 1,431 images from every shard
    labels = np.arange(len(ids)) % 7
    ds = cached.dataset(ids, labels)
    assert len(ds) == len(ids)
    image, label = ds[5]
    np.testing.assert_array_equal(image.numpy(), cached.rows([ids[5]])[0]) and int(label) == labels[5]

    # What a worker receives: shard paths, no open memory maps.
    assert ds.shards._open  # the parent opened one for ds[5]
    assert pickle.loads(pickle.dumps(ds)).shards._open == {}

    loader = DataLoader(ds, batch_size=128, num_workers=2, collate_fn=collate_batch)
    images = torch.cat([x for x, _ in loader]).numpy()
    got_labels = torch.cat([y for _, y in loader]).numpy()
    np.testing.assert_array_equal(images, cached.rows(ids))
    np.testing.assert_array_equal(got_labels, labels)

    # Ready for torchrun: a DistributedSampler splits it into disjoint per-rank parts that cover it.
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        part = DataLoader(ds, batch_size=64, sampler=sampler, num_workers=1, collate_fn=collate_batch)
        seen.append(torch.cat([y for _, y in part]).numpy())
        assert len(seen[-1]) == len(ids) // 2
    order = [list(DistributedSampler(ds, num_replicas=2, rank=r, seed=3, drop_last=True)) for r in range(2)]
    assert not set(order[0]) & set(order[1])
    np.testing.assert_array_equal(seen[0], labels[order[0]])


def test_each_shard_is_hashed_once_per_process(dataset_28px, store, tmp_path, monkeypatch, small_shards):
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path / "build")
    built = load_images(Context(store, tmp_path / "build"), dataset, SIZE)
    hashed = []
    real = imagecache.sha256_file
    monkeypatch.setattr(imagecache, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    reader = load_images(Context(store, tmp_path / "read"), dataset, SIZE)
    for _ in range(3):
        reader.rows(built.ids[::500])
    assert sorted(hashed) == ["00000.npy", "00001.npy", "00002.npy", "00003.npy"]


def test_corrupt_shards_are_refetched_or_refused(dataset_28px, store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dermaops.imagecache")
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path / "a")
    built = load_images(Context(store, tmp_path / "a"), dataset, SIZE_CORRUPT)
    local = tmp_path / "b" / "imagecache" / dataset.version / str(SIZE_CORRUPT) / shard_name(0)
    reader = load_images(Context(store, tmp_path / "b"), dataset, SIZE_CORRUPT)
    reader.rows(built.ids[:1])

    # A damaged scratch copy (same size) is downloaded again, in a new process (a new reader).
    data = bytearray(local.read_bytes())
    data[-1] ^= 0xFF
    local.write_bytes(bytes(data))
    imagecache._VERIFIED.clear()
    again = load_images(Context(store, tmp_path / "b"), dataset, SIZE_CORRUPT)
    np.testing.assert_array_equal(again.rows(built.ids[-3:]), built.rows(built.ids[-3:]))
    assert "corrupt; downloading it again" in caplog.text

    # A damaged object in S3 is refused with one line naming it, and nothing is left in scratch.
    uri = cache_uri(dataset, SIZE_CORRUPT).join(shard_name(0))
    store.put_bytes(uri, bytes(data))
    local.unlink()
    with pytest.raises(StageError, match=f"checksum mismatch for {uri}: the image cache is corrupt"):
        load_images(Context(store, tmp_path / "b"), dataset, SIZE_CORRUPT).rows(built.ids[:1])
    assert not local.exists()


def test_old_single_file_cache_is_rebuilt_as_shards(dataset_28px, store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dermaops.imagecache")
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path)
    prefix = cache_uri(dataset, SIZE_LEGACY)
    # What the previous release published: one array, its ids, a manifest with the old format's fingerprint.
    store.put_bytes(prefix.join("images.npy"), b"\x93NUMPY old single-file cache")
    store.put_json(prefix.join("image_ids.json"), ["ISIC_0024306"])
    store.put_json(
        prefix.join("manifest.json"),
        {"stage": "imagecache", "fingerprint": "old", "summary": {"format": "pil-rgb-bicubic-squash-v1"}},
    )
    cached = load_images(Context(store, tmp_path), dataset, SIZE_LEGACY)
    assert "holds the old single-file format (images.npy); rebuilding it as" in caplog.text
    assert len(cached) == 10015 and cached.rows(["ISIC_0024306"]).shape == (1, SIZE_LEGACY, SIZE_LEGACY, 3)
    assert store.get_json(prefix.join("manifest.json"))["summary"]["shards"] == [[shard_name(0), 10015]]
    assert not store.exists(prefix.join("images.npy"))


def test_out_of_range_size_is_refused(dataset_28px, store, tmp_path):
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path)
    with pytest.raises(StageError, match="image size 4 is out of range"):
        load_images(Context(store, tmp_path), dataset, 4)


def _originals(pack) -> list[bytes]:
    out = []
    for name in ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip"):
        with zipfile.ZipFile(pack / name) as zf:
            out += [zf.read(info) for info in zf.infolist() if info.filename.endswith(".jpg")]
    return out


def test_draft_decoding_matches_a_full_decode_within_35_db(pack_sample):
    originals = _originals(pack_sample)
    assert len(originals) == 70
    with Image.open(io.BytesIO(originals[0])) as img:
        assert img.size == (600, 450)
        img.draft("RGB", (224, 224))
        assert img.size == (300, 225)  # DCT-scaled by 1/2: the smallest scale still >= 224 x 224
    worst = np.inf
    for data in originals:
        draft, full = decode_image(data, 224), decode_full(data, 224)
        assert draft.shape == full.shape == (224, 224, 3)
        mse = np.mean((draft.astype(np.float64) - full.astype(np.float64)) ** 2)
        worst = min(worst, 10 * np.log10(255.0**2 / mse))
    assert worst >= 35.0, f"worst PSNR {worst:.1f} dB"
