"""Resumable checkpoints of a run and where a run starts: fresh, resumed, or already complete.

Every run can resume: its start (the converted checkpoint and the seed) is a restart point too. A
resumed run continues from its last checkpoint, or from the start when none was written, and
recomputes the iterations recorded after that point. Each recomputed record must equal the recorded
one (so `--resume` is a reproducibility check of its own); the recorded ledger is never rewritten."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .ledger import LEDGER_FILE, Ledger, differing_phases, read_ledger
from .megatron.checkpoint import checkpoint_complete
from .ray.errors import RunError
from .rundir import check_out_dir, resume_mismatch
from .util import atomic_dir, atomic_write_text, utc_stamp

CKPT_DIR = "checkpoints"


@dataclass
class Checkpoint:
    iteration: int  # the last iteration whose record precedes the checkpoint
    path: Path


@dataclass
class Start:
    iteration: int  # the first iteration to run
    checkpoint: Checkpoint | None  # to load before it (None: from the converted checkpoint)
    done: Ledger | None  # the run's ledger when it is already complete
    recorded: Ledger | None = None  # resuming: the ledger so far, whose later iterations are recomputed

    @property
    def resuming(self) -> bool:
        return self.recorded is not None


class ResumeDivergence(RunError):
    """A resumed run recomputed a recorded iteration and got other bits: the run is not reproducible."""


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    for d in sorted((run_dir / CKPT_DIR).glob("iter_*"), reverse=True):
        meta = d / "meta.json"
        if meta.exists() and (d / "optimizer_tp0.pt").exists() and checkpoint_complete(d / "weights"):
            m = json.loads(meta.read_text())
            return Checkpoint(m["iteration"], d)
    return None


def saved(run_dir: Path, it: int) -> bool:
    """Iteration `it`'s checkpoint is on disk, complete (a resumed run recomputing it keeps it)."""
    d = run_dir / CKPT_DIR / f"iter_{it:05d}"
    return (d / "meta.json").exists() and checkpoint_complete(d / "weights")


def due(cfg: RunConfig, it: int) -> bool:
    every = cfg.checkpoint.every
    return bool(every) and (it + 1) % every == 0 and it + 1 < cfg.train.steps


def save(workers: Any, run_dir: Path, it: int, cfg: RunConfig) -> None:
    """All trainer ranks write into a temp directory that is renamed into place when complete."""
    with atomic_dir(run_dir / CKPT_DIR / f"iter_{it:05d}") as tmp:
        workers.save_checkpoint(it, str(tmp))
        (tmp / "meta.json").write_text(
            json.dumps(
                {
                    "iteration": it,
                    "ledger_bytes": (run_dir / LEDGER_FILE).stat().st_size,
                    "config_hash": cfg.config_hash(),
                    "saved_at": utc_stamp(),
                }
            )
        )
    for old in sorted((run_dir / CKPT_DIR).glob("iter_*"))[: -cfg.checkpoint.keep]:
        shutil.rmtree(old, ignore_errors=True)
    # atomic_dir's swap lock: one writer holds a run directory (rundir.exclusive), so it has no one to guard
    for lock in (run_dir / CKPT_DIR).glob(".iter_*.lock"):
        lock.unlink(missing_ok=True)


def start_point(cfg: RunConfig, run_dir: Path, resume: bool) -> Start:
    """Where the run begins: fresh, complete already, or resumed from its last checkpoint (from the start
    when it has none)."""
    if not resume:
        check_out_dir(run_dir)
    if not (run_dir / LEDGER_FILE).exists():
        return Start(0, None, None)
    if (why := resume_mismatch(run_dir, cfg)) is not None:
        raise ConfigError(why)
    existing = read_ledger(run_dir)
    if existing.complete:
        return Start(cfg.train.steps, None, existing)
    if existing.invalid or existing.header is None:
        raise ConfigError(
            f"{run_dir} cannot be resumed: its ledger is not valid ({'; '.join(existing.problems[:2])}); "
            "the ledger is kept as it is. Rerun into a new --out"
        )
    for half in (run_dir / CKPT_DIR).glob(".iter_*"):  # a kill during a save leaves its temp dir
        shutil.rmtree(half, ignore_errors=True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and ckpt.iteration >= len(existing.iterations):
        ckpt = None  # a checkpoint ahead of the ledger (it was edited): recompute from the start
    return Start(0 if ckpt is None else ckpt.iteration + 1, ckpt, None, existing)


def check_recomputed(run_dir: Path, recorded: dict[str, Any], record: dict[str, Any]) -> None:
    """A resumed run's record of an iteration it recomputed must equal the recorded one in every hash (the
    phases verify compares, the eval's tokens included).
    On a mismatch the recomputed record goes to resume-divergence-ITER.json beside the ledger."""
    it = record["iteration"]
    differing = differing_phases(recorded, record)
    if not differing and recorded["tensors"] == record["tensors"]:
        return
    path = run_dir / f"resume-divergence-{it:05d}.json"
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    raise ResumeDivergence(
        f"the resumed run recomputed iteration {it} and it differs from the recorded one, first in "
        f"{differing[0] if differing else 'the per-tensor digests'}"
        + (f" (also {', '.join(differing[1:])})" if len(differing) > 1 else "")
        + f": the run is not reproducible. The ledger is kept as recorded; the recomputed record is in {path}"
    )


def restore(workers: Any, run_dir: Path, start: Start, header: dict[str, Any]) -> None:
    """Load the checkpoint (if any) into the trainers and log the resume."""
    if start.checkpoint is not None:
        workers.load_checkpoint(str(start.checkpoint.path))
    recorded = len(start.recorded.iterations) if start.recorded else 0
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "resumed_at": header["started_at"],
                    "from_checkpoint": None if start.checkpoint is None else start.checkpoint.iteration,
                    "recomputes": list(range(start.iteration, recorded)),
                    "fingerprints": header["fingerprints"],
                }
            )
            + "\n"
        )
