"""What the runner knows about each stage: which image runs it and whether it can use a GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

DATA_STAGES = ("ingest", "validate", "split", "train_baseline", "notify")
TORCH_STAGES = ("train", "evaluate", "predict")


def _image_tag() -> str:
    # Images are tagged with the stage package's version (scripts/build-images). The Airflow
    # environment installs the same package, so its version names the matching images.
    try:
        return metadata.version("dermaops")
    except metadata.PackageNotFoundError:
        return "latest"


@dataclass(frozen=True)
class StageSpec:
    stage: str
    image: str
    gpu: bool  # wants the GPU when DERMAOPS_GPU=1 (train, evaluate, predict)
    shm_size: int | None  # bytes of /dev/shm for PyTorch data loaders; None: Docker's default


def spec_for(stage: str) -> StageSpec:
    if stage in TORCH_STAGES:
        image = os.environ.get("DERMAOPS_TORCH_IMAGE") or f"dermaops-torch:{_image_tag()}"
        return StageSpec(stage, image, gpu=True, shm_size=2 * 1024**3)
    if stage in DATA_STAGES:
        image = os.environ.get("DERMAOPS_DATA_IMAGE") or f"dermaops-data:{_image_tag()}"
        return StageSpec(stage, image, gpu=False, shm_size=None)
    raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(DATA_STAGES + TORCH_STAGES)})")
