"""What the runner knows about each stage: which image runs it, whether it can use a GPU, which secrets
it gets. The stages themselves are listed once, in the stage package's registry (dermaops.pipeline)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from dermaops.pipeline import stage as registered_stage

# The image of each kind: an explicit reference from the environment, else the locally built tag.
IMAGE_ENV = {"data": "DERMAOPS_DATA_IMAGE", "torch": "DERMAOPS_TORCH_IMAGE"}
# PyTorch stages get 2 GiB of /dev/shm; the data stages keep Docker's default. Train runs one process
# per GPU, each with DataLoader workers handing every batch through /dev/shm and NCCL's intra-host
# buffers there too: it gets 16 GiB. /dev/shm is a tmpfs, so only what is used takes memory.
SHM_SIZE = {"data": None, "torch": 2 * 1024**3}
STAGE_SHM_SIZE = {"train": 16 * 1024**3}


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
    secrets: tuple[str, ...] = ("s3",)  # credential sets resolved at execute time
    s3_role: str = "data"  # whose S3 key the stage gets (dermaops.access)


def spec_for(stage: str) -> StageSpec:
    entry = registered_stage(stage)  # ValueError naming the known stages
    image = os.environ.get(IMAGE_ENV[entry.image]) or f"dermaops-{entry.image}:{_image_tag()}"
    shm_size = STAGE_SHM_SIZE.get(stage, SHM_SIZE[entry.image])
    return StageSpec(stage, image, gpu=entry.gpu, shm_size=shm_size, secrets=entry.secrets, s3_role=entry.s3_role)
