"""Batch prediction with a stored model: which images, which model, and what the model says about them.

Used by the `predict` stage. Three things are decided here:

Which images. `--images` is a local folder, a zip, or an s3:// prefix. Files are judged by their
bytes, not their names: a JPEG is predicted, a zip is opened and its members judged the same way,
dot-files and `__MACOSX/` are skipped, and sidecar files that travel with image folders (metadata
CSV/TSV/JSON/text, SHA256SUMS) are listed as ignored. Anything else (a PNG, a HEIC, a PDF, a
corrupt JPEG, one whose data does not fit the size its header declares, one over the pixel limit of
dermaops.imagefile) stops the run with one line naming it: the model was trained on JPEG photographs and
a silently skipped image is a missing prediction nobody notices. Names are data: an S3 key is saved
under scratch only as a plain relative path (dermaops.safepath), and zip members are read in memory,
within the size limits of dermaops.archives.

Which model. `champion` resolves `<registry>/champion.json` (dermaops.promotion's layout) and
verifies the checkpoint's sha256 against it; otherwise an s3:// URI of a checkpoint (`.pt`) or of a
prefix holding `cnn.pt` (a train output or a registry `models/<run_id>-<sha12>/` folder).

What it says. Every image goes through training's exact preprocessing (imagecache.decode_image:
PIL RGB, bicubic squash to the model's size), then the checkpoint's Predictor (dermaops.predictor): the
model's normalisation and optionally the 8-view test-time augmentation evaluate scores with, the logit
adjustment, the `temperature`, and the melanoma operating point (`mel_threshold` from champion.json first,
then the checkpoint's meta; argmax == mel without one). Which of them applied is reported in every output.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermaops.archives import check_member, read_member
from dermaops.errors import StageError
from dermaops.safepath import local_path
from dermaops.store import ArtifactStore, S3Uri, sha256_file

CHAMPION = "champion"
JPEG_MAGIC = b"\xff\xd8\xff"
ZIP_MAGIC = b"PK\x03\x04"
SIDECAR_SUFFIXES = (".csv", ".tab", ".tsv", ".txt", ".json", ".md")
SIDECAR_NAMES = ("SHA256SUMS", "MD5SUMS", "LICENSE", "README")
KNOWN_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
)

log = logging.getLogger(__name__)


# -- images ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputImage:
    name: str  # where it came from, relative to --images: "a/ISIC_1.jpg" or "part_1.zip:ISIC_1.jpg"
    path: Path  # the local file (the zip, for a zip member)
    member: str | None = None

    @property
    def image_id(self) -> str:
        base = (self.member or self.name).rsplit("/", 1)[-1]
        return base.rsplit(".", 1)[0] if "." in base else base

    def read(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        with zipfile.ZipFile(self.path) as zf:
            return read_member(zf, zf.getinfo(self.member), self.name.rsplit(":", 1)[0])


@dataclass
class ImageInputs:
    spec: str
    images: list[InputImage]
    ignored: list[str]
    files: dict[str, str] = field(default_factory=dict)  # top-level file -> sha256: the fingerprint's input


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.split("/"))


def _sidecar(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name.upper() in SIDECAR_NAMES or name.lower().endswith(SIDECAR_SUFFIXES)


def _not_jpeg(name: str, head: bytes, spec: str) -> StageError:
    what = next((label for magic, label in KNOWN_MAGIC if head.startswith(magic)), None)
    what = what or ("an empty file" if not head else "not an image")
    return StageError(
        f"--images {spec}: {name} is not a JPEG ({what}); batch prediction reads JPEG photographs like the "
        "HAM10000 originals: convert it or move it out of the folder"
    )


def _judge_zip(path: Path, relative: str, spec: str, images: list, ignored: list) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise StageError(f"--images {spec}: {relative} is not a readable zip ({exc})") from exc
    with zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir() or _hidden(info.filename):
                continue
            name = f"{relative}:{info.filename}"
            check_member(info, f"--images {spec}: {relative}")  # before the batch starts, not half-way through it
            with zf.open(info) as f:
                head = f.read(4)
            if head.startswith(JPEG_MAGIC):
                images.append(InputImage(name, path, info.filename))
            elif _sidecar(info.filename):
                ignored.append(name)
            else:
                raise _not_jpeg(name, head, spec)


def _judge(path: Path, relative: str, spec: str, images: list, ignored: list) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(JPEG_MAGIC):
        images.append(InputImage(relative, path))
    elif head.startswith(ZIP_MAGIC):
        _judge_zip(path, relative, spec, images, ignored)
    elif _sidecar(relative):
        ignored.append(relative)
    else:
        raise _not_jpeg(relative, head, spec)


def _local_files(spec: str) -> tuple[Path, list[tuple[str, Path]]]:
    root = Path(spec).expanduser()
    if root.is_file():
        return root.parent, [(root.name, root)]
    if not root.is_dir():
        raise StageError(f"--images {spec}: no such file or folder (expected a folder, a zip or an s3:// prefix)")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if not _hidden(relative):
                files.append((relative, path))
    return root, files


def _s3_files(spec: str, store: ArtifactStore, scratch: Path) -> list[tuple[str, Path]]:
    prefix = S3Uri.parse(spec)
    base = prefix.key.rstrip("/") + "/" if prefix.key else ""
    wanted = []
    for uri, _size in sorted(store.list(prefix), key=lambda item: item[0].key):
        relative = uri.key[len(base) :]
        if not relative or relative.endswith("/"):
            continue
        # `<prefix>//tmp/x` is the absolute /tmp/x relative to the prefix: every name is checked (before the
        # dot-files are skipped, so `..` is refused too) before the first download, so a refused one leaves
        # nothing written anywhere.
        path = local_path(scratch / "inputs", relative, f"--images {spec}: object {uri}")
        if not _hidden(relative):
            wanted.append((relative, uri, path))
    return [(relative, store.download(uri, path)) for relative, uri, path in wanted]


def collect_images(spec: str, store: ArtifactStore, scratch: Path) -> ImageInputs:
    """Every JPEG under `spec` (folder, zip or s3:// prefix), in a stable order; StageError naming the
    first file that is neither a JPEG nor a known sidecar, or saying that there is no image at all."""
    files = _s3_files(spec, store, scratch) if spec.startswith("s3://") else _local_files(spec)[1]
    images: list[InputImage] = []
    ignored: list[str] = []
    for relative, path in files:
        _judge(path, relative, spec, images, ignored)
    if not images:
        found = f"only {', '.join(ignored[:5])}" if ignored else "nothing"
        raise StageError(f"--images {spec}: no JPEG image found ({found} there)")
    return ImageInputs(spec, images, ignored, {relative: sha256_file(path) for relative, path in files})


# -- the model ---------------------------------------------------------------------------------
@dataclass
class ResolvedModel:
    path: Path  # local, verified copy of the checkpoint
    uri: str
    sha256: str
    champion: dict | None  # champion.json when --model champion

    @property
    def describe(self) -> dict:
        out = {"model_uri": self.uri, "model_sha256": self.sha256, "resolved_from": "uri"}
        if self.champion is not None:
            out |= {"resolved_from": "champion", "champion_run_id": self.champion.get("run_id")}
        return out


def resolve_model(store: ArtifactStore, spec: str, registry: str | None, scratch: Path) -> ResolvedModel:
    """The checkpoint `--model` names, downloaded into scratch and checked against its recorded sha256."""
    dest = scratch / "model" / "cnn.pt"
    if spec == CHAMPION:
        from dermaops.promotion import Registry

        if not registry:
            raise StageError("--model champion needs --registry (e.g. s3://<bucket>/registry/ham10000)")
        reg = Registry(store, S3Uri.parse(registry))
        record, problem = reg.champion_record()
        if record is None:
            raise StageError(
                problem
                or f"no champion at {reg.champion_uri}: no model has been promoted yet "
                "(pass --model s3://.../cnn.pt to predict with a run's checkpoint)"
            )
        path, problem = reg.fetch_champion_model(record, dest)
        if path is None:
            raise StageError(problem)
        return ResolvedModel(path, record["model_uri"], record["model_sha256"], record)

    if not spec.startswith("s3://"):
        raise StageError(f"--model {spec!r}: expected 'champion' or an s3:// URI of a checkpoint or a model prefix")
    uri = S3Uri.parse(spec)
    recorded = None
    if not uri.key.endswith(".pt"):
        prefix, uri = uri, uri.join("cnn.pt")
        if not store.exists(uri):
            raise StageError(f"--model {spec}: no cnn.pt under this prefix (pass the checkpoint's own URI)")
        if store.exists(prefix.join("manifest.json")):
            recorded = store.get_json(prefix.join("manifest.json")).get("files", {}).get("cnn.pt", {}).get("sha256")
    store.download(uri, dest)
    sha256 = sha256_file(dest)
    if recorded and recorded != sha256:
        raise StageError(f"--model {spec}: cnn.pt is corrupt (sha256 differs from its manifest.json)")
    return ResolvedModel(dest, str(uri), sha256, None)


def load_model(resolved: ResolvedModel, device: str):
    """The checkpoint's Predictor, its melanoma rule from champion.json first; StageError if the checkpoint is
    not a HAM10000 classifier of ours."""
    from dermaops.dataset import CLASSES
    from dermaops.predictor import Predictor

    return Predictor.load(
        resolved.path, device, classes=CLASSES, what=f"--model {resolved.uri}", champion=resolved.champion
    )


# -- prediction --------------------------------------------------------------------------------
@dataclass
class Batch:
    images: list[InputImage]
    pixels: np.ndarray  # (N, height, width, 3) uint8, training's preprocessing (the checkpoint's frame)
    proba: np.ndarray  # (N, C) calibrated probabilities


def decode_batch(images: list[InputImage], frame, spec: str, pool: ThreadPoolExecutor) -> np.ndarray:
    from dermaops.imagecache import decode_image
    from dermaops.imagefile import jpeg_mismatch

    def decode(item: InputImage) -> np.ndarray:
        data = item.read()
        try:
            pixels = decode_image(data, frame, f"--images {spec}: {item.name}")
        except (OSError, SyntaxError, ValueError) as exc:
            raise StageError(f"--images {spec}: {item.name} is not a readable JPEG ({exc})") from exc
        # libjpeg decodes a JPEG whose data does not fit its header without an error, making up the rows it
        # has no data for: a prediction on them would look like any other.
        if (mismatch := jpeg_mismatch(data)) is not None:
            raise StageError(
                f"--images {spec}: {item.name} is a corrupt JPEG: {mismatch}; not predicting on pixels the decoder "
                "would make up: re-export the image or move it out of the folder"
            )
        return pixels

    return np.stack(list(pool.map(decode, images)))


def predict_batches(predictor, inputs: ImageInputs, *, batch_size: int, tta: bool) -> Iterator[Batch]:
    """Calibrated probabilities (dermaops.predictor.Predictor) for every input image, a batch at a time (memory
    stays flat however many images there are: only one batch is ever decoded)."""
    frame = predictor.frame
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(inputs.images), batch_size):
            chunk = inputs.images[start : start + batch_size]
            pixels = decode_batch(chunk, frame, inputs.spec, pool)
            yield Batch(chunk, pixels, predictor.predict(pixels, tta=tta, batch_size=batch_size))


def draw_gradcams(predictor, batch: Batch, target: str, out_dir: Path) -> list[Path]:
    """One PNG per image (the model-size image beside its Grad-CAM overlay) of the predicted class's
    or the melanoma score; returned in the batch's order."""
    from dermaops.dataset import CLASSES
    from dermaops.gradcam import draw_grid, gradcam, pick_target_layer

    out_dir.mkdir(parents=True, exist_ok=True)
    predicted = batch.proba.argmax(axis=1)
    targets = np.full(len(batch.images), CLASSES.index("mel")) if target == "mel" else predicted
    model, meta, device = predictor.model, predictor.meta, predictor.device
    layer = pick_target_layer(model, meta)[0]
    heatmaps = np.zeros(batch.pixels.shape[:3], dtype=np.float32)
    for cls in np.unique(targets):
        rows = np.flatnonzero(targets == cls)
        heatmaps[rows] = gradcam(model, layer, batch.pixels[rows], meta, int(cls), device).heatmaps
    paths = []
    for i, item in enumerate(batch.images):
        cls = CLASSES[targets[i]]
        title = f"{item.image_id}\nGrad-CAM of {cls}, p({cls}) {batch.proba[i, targets[i]]:.2f}"
        path = out_dir / f"{i:06d}.png"
        draw_grid(path, batch.pixels[i : i + 1], heatmaps[i : i + 1], [title], columns=1)
        paths.append(path)
    return paths
