"""The run ledger: one JSON line per record (header, one per iteration, completion), each appended
with a single write + fsync, so a crash leaves at most one torn last line, which readers detect.
Also the hashing of arrays, and the per-step data files verify uses for max |diff|. No torch here
(tensor digests are `detrl.tensor_hash`): `detrl verify` reads ledgers without importing it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic import Field as PydField
from safetensors.numpy import load_file, save

from .config import hash_config
from .util import atomic_write_bytes

# 3: with determinism on, the schedule-only keys are not semantic either (config.SCHEDULE_ONLY), and the
# header records the run's request schedule; 2: config_hash covers the semantic keys only; 1: all keys
LEDGER_VERSION = 3
LEDGER_FILE = "ledger.jsonl"

# The order of the phases inside one iteration: verify reports the first that differs.
PHASES = (
    "policy_weights",
    "prompts",
    "rollout_tokens",
    "rollout_logprobs",
    "rewards",
    "advantages",
    "trainer_logprobs",
    "loss",
    "grad_norm",
    "weights",
)
PER_TENSOR = ("policy_weights", "weights")


def differing_phases(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The phases in which two records of one iteration differ, in the order they ran: PHASES, with the
    held-out eval (`eval.every`) between the policy sync and the rollout."""
    ha, hb = a.get("hashes") or {}, b.get("hashes") or {}
    out = [p for p in PHASES if ha.get(p) != hb.get(p)]
    if (a.get("eval") or {}).get("tokens") != (b.get("eval") or {}).get("tokens"):
        out.insert(1 if "policy_weights" in out else 0, "eval")
    return out


# ---------------------------------------------------------------- hashing


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


def ragged(rows: Sequence[Any], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list of variable-length rows -> (flat values, lengths)."""
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if len(rows) else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), lengths


def unragged(flat: np.ndarray, lengths: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """(flat values, lengths) -> the rows (views of `flat`): `ragged`'s inverse, the one way rows are cut."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def ragged_sha256(rows: Sequence[Any], dtype: Any) -> str:
    flat, lengths = ragged(rows, dtype)
    return hashlib.sha256((array_sha256(lengths) + array_sha256(flat)).encode()).hexdigest()


# ---------------------------------------------------------------- writing


class LedgerWriter:
    """Appends records to DIR/ledger.jsonl; each is flushed and fsynced before `append` returns."""

    def __init__(self, path: str | Path, *, drop_torn_tail: bool = False):
        """`drop_torn_tail` (resume): a last line cut off mid-write (no newline: never a record) is
        removed, so the next record starts on a line of its own; its bytes are kept in ledger.jsonl.torn."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if drop_torn_tail and self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                with open(self.path.with_name(self.path.name + ".torn"), "ab") as torn:
                    torn.write(data[keep:] + b"\n")
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
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

# Every record is validated against these schemas when read: a verdict never rests on a ledger whose
# structure was not checked (wrong types, missing or extra keys, combined hashes that do not match
# their per-tensor hashes). Strict: no coercion, so "0" is not 0.
_HEX64 = r"^[0-9a-f]{64}$"
_STRICT = ConfigDict(strict=True, extra="forbid")


class _Hashes(BaseModel):
    model_config = _STRICT
    policy_weights: str = PydField(pattern=_HEX64)
    prompts: str = PydField(pattern=_HEX64)
    rollout_tokens: str = PydField(pattern=_HEX64)
    rollout_logprobs: str = PydField(pattern=_HEX64)
    rewards: str = PydField(pattern=_HEX64)
    advantages: str = PydField(pattern=_HEX64)
    trainer_logprobs: str = PydField(pattern=_HEX64)
    loss: str = PydField(pattern=_HEX64)
    grad_norm: str = PydField(pattern=_HEX64)
    weights: str = PydField(pattern=_HEX64)


_DIGEST = re.compile(r"(xxh3_128|sha256):[0-9a-f]+")
_TensorList = list[Annotated[list[str], PydField(min_length=2, max_length=2)]]  # [name, digest] pairs


class _Tensors(BaseModel):
    model_config = _STRICT
    policy_weights: _TensorList
    weights: _TensorList


class _Hashed(BaseModel):  # an artifact: what verify compares is its content hash
    model_config = ConfigDict(strict=True, extra="allow")
    sha256: str


class _Converted(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    hf_sha256: str


class _Artifacts(BaseModel):
    model_config = _STRICT
    model: _Hashed
    data: _Hashed
    megatron: _Converted
    reward: _Hashed | None = None  # name and source hash (absent before ledger version 3)


class HeaderRecord(BaseModel):
    model_config = _STRICT
    kind: Literal["header"]
    version: Literal[1, 2, 3]
    run_id: str
    detrl: str
    profile: str
    config: dict[str, Any]
    config_hash: str = PydField(pattern=_HEX64)
    artifacts: _Artifacts
    engine: dict[str, Any]
    selftest: dict[str, Any] | None
    prompts_available: int = PydField(ge=0)
    prompts_dropped: int = PydField(ge=0)
    fingerprints: dict[str, dict[str, Any]]
    placement: dict[str, Any]
    startup_s: dict[str, float] = {}  # seconds per start-up part (absent in older ledgers)
    schedule: dict[str, Any] | None = None  # how the run sent its requests (detrl.schedule; absent before v3)
    started_at: str

    @model_validator(mode="after")
    def _config_is_a_run_config(self) -> HeaderRecord:
        """Every recorded config value has its key's exact type (semantic or not): "2" or 2.0 for an int
        is a changed ledger, not the same value."""
        from .config import RunConfig

        try:
            RunConfig.model_validate(self.config, strict=True)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(x) for x in e["loc"])
            raise ValueError(f"config.{loc}: {e['msg']} (got {e.get('input')!r:.60})") from None
        return self

    @model_validator(mode="after")
    def _config_matches_its_hash(self) -> HeaderRecord:
        blob = json.dumps(self.config, sort_keys=True, separators=(",", ":")).encode()
        expected = hash_config(self.config, self.version) if self.version >= 2 else hashlib.sha256(blob).hexdigest()
        if expected != self.config_hash:
            raise ValueError("config_hash does not match the recorded config (one of them was changed)")
        return self


class _Eval(BaseModel):
    model_config = _STRICT
    tokens: str = PydField(pattern=_HEX64)  # the greedy responses to the held-out prompts
    accuracy: float
    prompts: int = PydField(ge=1)


class IterationRecord(BaseModel):
    model_config = _STRICT
    kind: Literal["iteration"]
    iteration: int = PydField(ge=0)
    hashes: _Hashes
    tensors: _Tensors
    stats: dict[str, float | None]
    step_data: str | None = PydField(None, pattern=_HEX64)  # SHA-256 of steps/iter_N.safetensors (v3)
    eval: _Eval | None = None  # eval.every: the held-out greedy eval of the policy entering the iteration

    @model_validator(mode="after")
    def _combined_hashes_match(self) -> IterationRecord:
        for phase in PER_TENSOR:
            pairs = getattr(self.tensors, phase)
            names = [n for n, _ in pairs]
            if len(set(names)) != len(names):
                raise ValueError(f"tensors.{phase} names a tensor twice")
            bad = [d for _, d in pairs if not _DIGEST.fullmatch(d)]
            if bad:
                raise ValueError(f"tensors.{phase} holds a digest that is not ALGO:HEX: {bad[0]!r:.60}")
            if combine(dict(pairs)) != getattr(self.hashes, phase):
                raise ValueError(f"hashes.{phase} is not the combined hash of tensors.{phase}")
        return self


class CompletionRecord(BaseModel):
    model_config = _STRICT
    kind: Literal["complete"]
    iterations: int = PydField(ge=0)
    final_weights: str
    wall_s: float
    finished_at: str


RECORDS: dict[str, type[BaseModel]] = {
    "header": HeaderRecord,
    "iteration": IterationRecord,
    "complete": CompletionRecord,
}


def _schema_problem(where: str, kind: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        got = "" if e["type"] == "missing" or not loc else f" (got {e['input']!r:.80})"
        parts.append(f"{loc + ': ' if loc else ''}{e['msg']}{got}")
    more = f" (+{err.error_count() - 3} more)" if err.error_count() > 3 else ""
    return f"{where}: invalid {kind} record: " + "; ".join(parts) + more


@dataclass
class Ledger:
    path: str
    header: dict[str, Any] | None = None
    iterations: list[dict[str, Any]] = field(default_factory=list)
    completion: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    invalid: bool = False  # a record broke the schema or the order (not merely unfinished or torn)

    @property
    def complete(self) -> bool:
        return self.header is not None and self.completion is not None and not self.problems

    @property
    def run_dir(self) -> Path:
        return Path(self.path).parent


def _check(led: Ledger, where: str, rec: Any, expected: str | None) -> str | None:
    """The problem with record `rec` at `where`, given the kinds allowed there; None if it is valid."""
    if not isinstance(rec, dict):
        return f"{where}: a record must be a JSON object, got {type(rec).__name__} {rec!r:.60}"
    kind = rec.get("kind")
    kind = kind if isinstance(kind, str) else repr(kind)
    if led.completion is not None:
        return f"{where}: a {kind!r} record after the completion record (nothing may follow it)"
    if kind not in RECORDS:
        return f"{where}: unknown record kind {kind!r} (expected one of {sorted(RECORDS)})"
    if expected == "header" and kind != "header":
        return f"{where}: the first record is {kind!r}, not the header"
    if expected != "header" and kind == "header":
        return f"{where}: a second header record"
    try:
        RECORDS[kind].model_validate(rec)
    except ValidationError as err:
        return _schema_problem(where, kind, err)
    if kind == "iteration" and rec["iteration"] != len(led.iterations):
        seen = rec["iteration"] < len(led.iterations)
        return f"{where}: iteration {rec['iteration']!r} " + (
            "repeats an iteration already recorded" if seen else f"where {len(led.iterations)!r} was expected"
        )
    if kind == "complete":
        if rec["iterations"] != len(led.iterations):
            return (
                f"{where}: the completion record says {rec['iterations']!r} iterations, the ledger holds "
                f"{len(led.iterations)!r}"
            )
        last = led.iterations[-1]["hashes"]["weights"] if led.iterations else ""
        if rec["final_weights"] != last:
            return f"{where}: final_weights {rec['final_weights']!r:.24} is not the last iteration's weights hash"
    return None


class _NotStrictJSON(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise _NotStrictJSON(f"the key {dup!r} appears twice in one object (which one counts is undefined)")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise _NotStrictJSON(f"{name} is not a JSON number")


def strict_json(line: bytes) -> Any:
    """A record as JSON allows nothing ambiguous: no BOM, no duplicated key, no NaN or Infinity."""
    if line.startswith(b"\xef\xbb\xbf"):
        raise _NotStrictJSON("a byte-order mark before the record")
    return json.loads(line, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)


def read_ledger(path_or_dir: str | Path) -> Ledger:
    """Parse and validate a ledger; never raises on content: every defect goes to `problems`.
    Reading stops at the first invalid record."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / LEDGER_FILE
    led = Ledger(path=str(p))
    if not p.is_file():
        led.problems.append(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
        return led
    lines = p.read_bytes().split(b"\n")
    torn = lines.pop() != b""  # a complete ledger ends with a newline, leaving one empty piece
    for n, line in enumerate(lines, 1):
        where = f"{p}:{n}"
        try:
            rec = strict_json(line)
        except _NotStrictJSON as exc:
            led.problems.append(f"{where}: not strict JSON: {exc}")
            led.invalid = True
            return led
        except ValueError:
            led.problems.append(f"{where}: not valid JSON")
            led.invalid = True
            return led
        problem = _check(led, where, rec, "header" if n == 1 else None)
        if problem is not None:
            led.problems.append(problem)
            led.invalid = True
            return led
        if rec["kind"] == "header":
            led.header = rec
        elif rec["kind"] == "iteration":
            led.iterations.append(rec)
        else:
            led.completion = rec
    bad_steps = _step_file_problems(led)
    if bad_steps:
        led.problems += bad_steps
        led.invalid = True
        return led
    if torn:
        led.problems.append(f"{p}:{len(lines) + 1}: the last line is torn (no newline): the run was cut off mid-write")
    elif led.header is None:
        led.problems.append(f"{p} is empty")
    elif led.completion is None:
        led.problems.append(
            f"{p} has no completion record: the run did not finish ({len(led.iterations)} iterations recorded)"
        )
    return led


# ---------------------------------------------------------------- per-step data

STEP_DIR = "steps"


def step_data_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / STEP_DIR / f"iter_{iteration:05d}.safetensors"


def step_data_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def save_step_data(run_dir: str | Path, iteration: int, blob: bytes) -> None:
    atomic_write_bytes(step_data_path(run_dir, iteration), blob)


def _step_file_problems(led: Ledger) -> list[str]:
    """Every step-data file an iteration record hashes (`step_data`) must have exactly those bytes: a
    verdict never reads tokens from a swapped, truncated or edited file. A file that is gone is only a
    coarser verdict (the hashes still compare)."""
    out = []
    for rec in led.iterations:
        want = rec.get("step_data")
        p = step_data_path(led.run_dir, rec["iteration"])
        if want is not None and p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() != want:
            out.append(f"{p}: its bytes are not the ones iteration {rec['iteration']}'s record hashes (step_data)")
    return out


def load_step_data(run_dir: str | Path, iteration: int) -> dict[str, np.ndarray] | None:
    """The step data of `iteration` (read_ledger has proven the file's bytes against its record's hash)."""
    p = step_data_path(run_dir, iteration)
    return load_file(str(p)) if p.exists() else None
