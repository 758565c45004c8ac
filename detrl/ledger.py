"""The run ledger: one JSON line per record (header, one per iteration, completion), each appended
with a single write + fsync, so a crash leaves at most one torn last line, which readers detect.
Also the hashing of tensors and ragged arrays, and the per-step data files verify uses for
max |diff|."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .util import atomic_write_bytes

LEDGER_VERSION = 1
LEDGER_FILE = "ledger.jsonl"

# The order of the phases inside one iteration: verify reports the first that differs.
PHASES = ("policy_weights", "prompts", "rollout_tokens", "rollout_logprobs", "rewards", "advantages",
          "trainer_logprobs", "loss", "grad_norm", "weights")
PER_TENSOR = ("policy_weights", "weights")


# ---------------------------------------------------------------- hashing

# Weight tensors are hashed with XXH3-128 by default: 11 GB/s against 1.25 GB/s for SHA-256 on the
# CI machine, and an accidental difference between two runs is caught just the same (nobody forges
# a collision here). `ledger.tensor_hash=sha256` switches to SHA-256. All other fields use SHA-256.
TENSOR_HASHES = ("xxh3_128", "sha256")


def _hasher(algo: str, header: bytes):
    if algo == "sha256":
        return hashlib.sha256(header)
    if algo == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128(header)
    raise ValueError(f"unknown tensor hash {algo!r}; choose from {TENSOR_HASHES}")


def tensor_digest(t: torch.Tensor, algo: str = "xxh3_128") -> str:
    """Hash over dtype, shape and the raw bytes (so 1.0 in fp32 and bf16 hash differently),
    prefixed with the algorithm so digests of different kinds never compare equal."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = _hasher(algo, f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return f"{algo}:{h.hexdigest()}"


_POOL: ThreadPoolExecutor | None = None


def tensor_digests(named: Mapping[str, torch.Tensor], algo: str = "xxh3_128") -> dict[str, str]:
    """Per-tensor digests, hashed in threads (both hashers release the GIL on large buffers)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    names = list(named)
    return dict(zip(names, _POOL.map(lambda n: tensor_digest(named[n], algo), names)))


def combine(hashes: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}={hashes[name]}\n".encode())
    return h.hexdigest()


def array_sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.data)
    return h.hexdigest()


def ragged(rows: Sequence[Sequence[Any]], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list of variable-length rows -> (flat values, lengths)."""
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if len(rows) else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), lengths


def ragged_sha256(rows: Sequence[Sequence[Any]], dtype: Any) -> str:
    flat, lengths = ragged(rows, dtype)
    return hashlib.sha256((array_sha256(lengths) + array_sha256(flat)).encode()).hexdigest()


# ---------------------------------------------------------------- writing

class LedgerWriter:
    """Appends records to DIR/ledger.jsonl; each is flushed and fsynced before `append` returns."""

    def __init__(self, path: str | Path, *, truncate_to: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None:  # resume: drop what comes after the checkpointed records
            with open(self.path, "r+b") as f:
                f.truncate(truncate_to)
                f.flush()
                os.fsync(f.fileno())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- reading

@dataclass
class Ledger:
    path: str
    header: dict[str, Any] | None = None
    iterations: list[dict[str, Any]] = field(default_factory=list)
    completion: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.header is not None and self.completion is not None and not self.problems

    @property
    def run_dir(self) -> Path:
        return Path(self.path).parent


def read_ledger(path_or_dir: str | Path) -> Ledger:
    """Parse a ledger; never raises on content: every defect goes to `problems`."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / LEDGER_FILE
    led = Ledger(path=str(p))
    if not p.exists():
        led.problems.append(f"{p} does not exist")
        return led
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        led.problems.append(f"{p}: the last line is torn (no newline): the run was cut off mid-write")
        lines.pop()
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            led.problems.append(f"{p}:{n}: not valid JSON")
            break
        kind = rec.get("kind")
        if n == 1:
            if kind != "header":
                led.problems.append(f"{p}: first record is {kind!r}, not the header")
                break
            if rec.get("version") != LEDGER_VERSION:
                led.problems.append(f"{p}: ledger version {rec.get('version')} (this det-rl reads {LEDGER_VERSION})")
            led.header = rec
        elif kind == "iteration":
            expected = len(led.iterations)
            if rec.get("iteration") != expected:
                led.problems.append(f"{p}:{n}: iteration {rec.get('iteration')} where {expected} was expected")
                break
            led.iterations.append(rec)
        elif kind == "complete":
            led.completion = rec
            if rec.get("iterations") != len(led.iterations):
                led.problems.append(f"{p}: completion says {rec.get('iterations')} iterations, "
                                    f"ledger has {len(led.iterations)}")
        else:
            led.problems.append(f"{p}:{n}: unknown record kind {kind!r}")
            break
    if led.header is None and not led.problems:
        led.problems.append(f"{p} is empty")
    elif led.completion is None and not any("torn" in x for x in led.problems):
        led.problems.append(f"{p} has no completion record: the run did not finish "
                            f"({len(led.iterations)} iterations recorded)")
    return led


# ---------------------------------------------------------------- per-step data

STEP_DIR = "steps"


def step_data_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / STEP_DIR / f"iter_{iteration:05d}.safetensors"


def save_step_data(run_dir: str | Path, iteration: int, arrays: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(step_data_path(run_dir, iteration),
                       save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def load_step_data(run_dir: str | Path, iteration: int) -> dict[str, np.ndarray] | None:
    from safetensors.numpy import load_file

    p = step_data_path(run_dir, iteration)
    return load_file(str(p)) if p.exists() else None
