"""Resumable checkpoints of a run and where a run starts: fresh, resumed from its last checkpoint, or
already complete. A resumed run writes a ledger identical, record for record, to one that never stopped."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .ledger import LEDGER_FILE, Ledger, read_ledger
from .megatron.checkpoint import checkpoint_complete
from .rundir import check_out_dir, resume_mismatch
from .util import atomic_dir, utc_stamp

CKPT_DIR = "checkpoints"


@dataclass
class Checkpoint:
    iteration: int  # the last iteration whose record precedes the checkpoint
    path: Path
    ledger_bytes: int  # the ledger's size right after that record


@dataclass
class Start:
    iteration: int  # the first iteration to run
    checkpoint: Checkpoint | None  # to load before it
    done: Ledger | None  # the run's ledger when it is already complete


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    for d in sorted((run_dir / CKPT_DIR).glob("iter_*"), reverse=True):
        meta = d / "meta.json"
        if meta.exists() and (d / "optimizer_tp0.pt").exists() and checkpoint_complete(d / "weights"):
            m = json.loads(meta.read_text())
            return Checkpoint(m["iteration"], d, m["ledger_bytes"])
    return None


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


def start_point(cfg: RunConfig, run_dir: Path, resume: bool, restart: bool = False) -> Start:
    """Where the run begins. `restart`: with a ledger but no checkpoint, start over in place (a
    Prefect retry owns its run directory) instead of refusing."""
    if not resume:
        check_out_dir(run_dir)
    if not (run_dir / LEDGER_FILE).exists():
        return Start(0, None, None)
    if (why := resume_mismatch(run_dir, cfg)) is not None:
        raise ConfigError(why)
    existing = read_ledger(run_dir)
    if existing.complete:
        return Start(cfg.train.steps, None, existing)
    for half in (run_dir / CKPT_DIR).glob(".iter_*"):  # a kill during a save leaves its temp dir
        shutil.rmtree(half, ignore_errors=True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return Start(ckpt.iteration + 1, ckpt, None)
    if not restart:
        raise ConfigError(
            f"{run_dir} has {len(existing.iterations)} recorded iteration(s) but no checkpoint to resume "
            "from (checkpoint.every was 0 or the run stopped before its first save); the ledger is kept. "
            "Rerun into a new --out, and set checkpoint.every=K from the start to make a run resumable"
        )
    (run_dir / LEDGER_FILE).unlink()
    shutil.rmtree(run_dir / "steps", ignore_errors=True)
    return Start(0, None, None)


def restore(workers: Any, run_dir: Path, ckpt: Checkpoint, header: dict[str, Any]) -> None:
    """Load the checkpoint into the trainers, drop step data written after it, and log the resume."""
    workers.load_checkpoint(str(ckpt.path))
    for step_file in (run_dir / "steps").glob("iter_*.safetensors"):
        if int(step_file.stem.split("_")[1]) > ckpt.iteration:
            step_file.unlink()
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "resumed_at": header["started_at"],
                    "from_checkpoint": ckpt.iteration,
                    "fingerprints": header["fingerprints"],
                }
            )
            + "\n"
        )
