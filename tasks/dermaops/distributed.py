"""Data-parallel training on one host: torch.distributed's elastic launcher (what `torchrun` runs) and the
few collectives the training loop needs.

`train --nproc-per-node N` (N > 1) makes the stage process a launcher. It checks every input itself (a
bad flag fails with one line before any worker starts), prefetches the image cache into its scratch
directory, and starts N copies of the same command line under the elastic agent, as `torchrun
--standalone --nproc-per-node N -m dermaops train ...` would: a c10d rendezvous on a free local port,
RANK / LOCAL_RANK / WORLD_SIZE in each copy's environment. A copy that sees those variables is a rank
(`from_env`): it joins the process group (NCCL on GPUs, gloo on CPU), reads the prefetched cache, and
trains its share of every batch under DistributedDataParallel. Rank 0 alone writes checkpoints and
outputs and publishes; the launcher returns rank 0's summary as its own, or fails with the one line and
exit code of the rank that failed first. The same command under an external `torchrun` (several hosts)
runs as ranks directly.

The agent restarts nothing (max_restarts 0): a failed rank is either a user error that would fail again
or one the orchestrator retries, and a retry resumes from the last checkpoint like any other.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dermaops.errors import StageError, TransientError

# Set by the launcher for its ranks: where they report back, and the scratch directory holding the cache.
LAUNCH_DIR_ENV = "DERMAOPS_LAUNCH_DIR"
CACHE_SCRATCH_ENV = "DERMAOPS_LAUNCH_SCRATCH"
LAUNCHER_PID_ENV = "DERMAOPS_LAUNCHER_PID"
SUMMARY_FILE = "summary.json"

log = logging.getLogger(__name__)


class WorkerFailed(StageError):
    """A rank failed without a one-line error of its own (a crash, a signal): its exit code, not 2."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; world_size 1 (SINGLE) makes every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- the collectives the training loop uses ----------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor):
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_cat(self, tensor):
        """Every rank's `tensor` (the same shape on each) concatenated in rank order along dim 0."""
        if not self.distributed:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_strided(self, tensor, n: int):
        """Reassemble rows that rank r computed for items r, r + W, r + 2W, ... of n items, in item order,
        on every rank (ranks hold ceil or floor of n / W rows; shorter ones are padded for the gather)."""
        if not self.distributed:
            return tensor
        import torch
        import torch.distributed as dist

        per = -(-n // self.world_size)
        padded = torch.zeros((per, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        # parts[r][i] is item i * W + r: stacking on dim 1 puts it at row i * W + r.
        return torch.stack(parts, dim=1).reshape(per * self.world_size, *tensor.shape[1:])[:n]

    def broadcast_module(self, module) -> None:
        """Rank 0's parameters and buffers on every rank (phase 2 starts from weights only rank 0 saved)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def wrap(self, model, device):
        """The module the training step calls: `model` itself, or DDP over it (which starts by copying rank 0's
        weights to every rank). Built per phase, after freezing: DDP all-reduces the gradients of the
        parameters that require one when it is built."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


SINGLE = Dist()


def in_worker() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def from_env() -> Dist | None:
    """This process's rank when a launcher (ours or torchrun) started it, else None."""
    if not in_worker():
        return None
    env = os.environ
    return Dist(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env["LOCAL_RANK"]),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
    )


def device_for(dist: Dist, device: str) -> str:
    """The device of this rank: its own GPU by local rank."""
    if device != "cuda" or not dist.distributed:
        return device
    import torch

    torch.cuda.set_device(dist.local_rank)
    return f"cuda:{dist.local_rank}"


def init(dist: Dist, device: str) -> None:
    """Join the job's process group: NCCL between GPUs, gloo between CPU processes. Ranks other than 0 log
    warnings only, so the job's log reads like one process's."""
    if not dist.distributed:
        return
    import datetime as dt

    import torch.distributed as tdist

    _die_with_launcher()
    if not dist.primary:
        logging.getLogger("dermaops").setLevel(logging.WARNING)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    # Generous: rank 0 alone uploads checkpoints between collectives, and a large one to a slow S3 takes a while.
    tdist.init_process_group(backend, timeout=dt.timedelta(minutes=30))
    log.info("rank %d of %d joined the %s process group", dist.rank, dist.world_size, backend)


def _die_with_launcher() -> None:
    """The agent starts each rank in a session of its own, so a launcher killed outright (SIGKILL, the OOM
    killer) would leave its ranks training, and rank 0 publishing, with nobody waiting for them. The kernel
    sends them SIGTERM when it dies instead (PR_SET_PDEATHSIG; Linux, where the images run)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != int(launcher):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def shutdown(dist: Dist) -> None:
    if not dist.distributed:
        return
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def cache_scratch(default: Path) -> Path:
    """Where a rank finds the image cache: the launcher's scratch directory, which it prefetched."""
    return Path(os.environ.get(CACHE_SCRATCH_ENV) or default)


# -- what ranks report to the launcher ------------------------------------------------------------
def _launch_dir() -> Path | None:
    value = os.environ.get(LAUNCH_DIR_ENV)
    return Path(value) if value and in_worker() else None


def report_summary(summary: dict) -> None:
    """Rank 0's summary, for the launcher to print as the stage's own (the ranks' stdout goes to log files)."""
    if (where := _launch_dir()) is not None:
        tmp = where / (SUMMARY_FILE + ".part")
        tmp.write_text(json.dumps(summary, default=str))
        tmp.replace(where / SUMMARY_FILE)


def report_error(exc: StageError) -> None:
    """A rank's one-line error and exit code, for the launcher to fail with."""
    if (where := _launch_dir()) is not None:
        blob = {"message": str(exc), "exit_code": exc.exit_code, "at": time.time(), "rank": os.environ.get("RANK")}
        (where / f"error-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(blob))


# -- the launcher ---------------------------------------------------------------------------------
def launch(argv: Sequence[str], nproc: int, scratch: Path) -> dict:
    """Run `python -m dermaops <argv>` as `nproc` ranks on this host; rank 0's summary."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs its whole configuration at INFO; the stage log keeps its warnings and errors.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dermaops-launch-") as tmp:
        where = Path(tmp)
        env = {LAUNCH_DIR_ENV: str(where), CACHE_SCRATCH_ENV: str(scratch), LAUNCHER_PID_ENV: str(os.getpid())}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # the agent starts the ranks with this process's environment
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
            max_restarts=0,
            monitor_interval=0.5,
            # stdout carries each rank's summary line, which the launcher replaces by rank 0's; stderr (the
            # log) passes straight through.
            logs_specs=DefaultLogsSpecs(log_dir=str(where / "logs"), redirects=Std.OUT),
        )
        log.info("launching %d training processes on this host (torch.distributed elastic, c10d rendezvous)", nproc)
        try:
            elastic_launch(config, sys.executable)("-m", "dermaops", *argv)
        except ChildFailedError as exc:
            raise _failure(where, exc) from None
        except SignalException as exc:
            raise TransientError(
                f"the launcher got {exc.sigval.name}: the {nproc} training processes were stopped; "
                "a rerun resumes from the last checkpoint"
            ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        summary_path = where / SUMMARY_FILE
        if not summary_path.exists():
            raise WorkerFailed("the training processes all exited 0 but rank 0 reported no summary", 1)
        return json.loads(summary_path.read_text())


def _failure(where: Path, exc) -> StageError:
    """The error of the rank that failed first: its own one line when it wrote one, else its exit code."""
    reports = [json.loads(p.read_text()) for p in where.glob("error-*.json")]
    if reports:
        first = min(reports, key=lambda r: r["at"])
        error = StageError(first["message"])
        error.exit_code = int(first["exit_code"])
        return error
    rank, failure = exc.get_first_failure()
    code = failure.exitcode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    # A crash is a bug or a lost resource: exit 1, which the orchestrator retries (the traceback is above).
    return WorkerFailed(f"training process rank {rank} {how}; its log is above", 1)
