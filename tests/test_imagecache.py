"""The image cache on the real 28 px pack: built once, published under the dataset, reused after."""

from __future__ import annotations

import io
import logging
import zipfile

import numpy as np
import pytest
from dermaops.dataset import Dataset
from dermaops.errors import StageError
from dermaops.imagecache import cache_uri, load_images
from dermaops.stage import Context
from dermaops.store import ArtifactStore, S3Uri
from PIL import Image

# A size no other test asks for, so this test sees the cache being built.
SIZE = 17


def _etag(store: ArtifactStore, uri: S3Uri) -> str:
    return store.client.head_object(Bucket=uri.bucket, Key=uri.key)["ETag"]


def test_cache_is_built_once_then_reused(dataset_28px, store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dermaops.imagecache")
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path / "a")
    first = load_images(Context(store, tmp_path / "a"), dataset, SIZE)
    assert "building" in caplog.text
    assert first.images.shape == (10015, SIZE, SIZE, 3) and first.images.dtype == np.uint8
    assert sorted(first.ids) == sorted(dataset.metadata["image_id"])
    prefix = cache_uri(dataset, SIZE)
    manifest = store.get_json(prefix.join("manifest.json"))
    assert manifest["summary"]["n_images"] == 10015
    etag = _etag(store, prefix.join("images.npy"))

    # A fresh scratch directory (another container): downloads, does not rebuild.
    caplog.clear()
    elsewhere = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path / "b")
    second = load_images(Context(store, tmp_path / "b"), elsewhere, SIZE)
    assert "reusing" in caplog.text and "building" not in caplog.text
    assert _etag(store, prefix.join("images.npy")) == etag
    assert store.get_json(prefix.join("manifest.json"))["created_at"] == manifest["created_at"]
    assert second.ids == first.ids
    np.testing.assert_array_equal(second.images, first.images)


def test_rows_follow_the_requested_order_and_pixels_match_the_jpeg(dataset_28px, store, tmp_path):
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path)
    cached = load_images(Context(store, tmp_path), dataset, 28)  # the pack's native size: no resizing
    ids = ["ISIC_0029306", "ISIC_0024306", "ISIC_0034320"]
    rows = cached.rows(ids)
    assert rows.shape == (3, 28, 28, 3)
    with zipfile.ZipFile(dataset.local("HAM10000_images_part_2.zip")) as zf:
        decoded = np.asarray(Image.open(io.BytesIO(zf.read("ISIC_0029306.jpg"))).convert("RGB"))
    np.testing.assert_array_equal(rows[0], decoded)
    assert not np.array_equal(rows[0], rows[1])
    with pytest.raises(StageError, match="2 image_ids are not in the image cache.*ISIC_9999998"):
        cached.rows(["ISIC_0024306", "ISIC_9999998", "ISIC_9999999"])


def test_out_of_range_size_is_refused(dataset_28px, store, tmp_path):
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path)
    with pytest.raises(StageError, match="image size 4 is out of range"):
        load_images(Context(store, tmp_path), dataset, 4)
