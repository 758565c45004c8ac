"""Compare two ledgers and say one verdict:
- identical (exit 0): every recorded hash matches, and the runs are one experiment run twice;
- diverged (exit 1): the first iteration, phase and tensors or sample/position that differ, and the
  likely cause;
- incomplete (exit 2): a ledger is missing, torn or unfinished;
- invalid (exit 2): a record breaks the ledger schema or order;
- different_experiments (exit 2): every recorded hash matches, but the runs differ in a semantic config
  key (config.NON_SEMANTIC and, with determinism on, config.SCHEDULE_ONLY list the others) or in their
  artifacts (model, data, conversion): nothing was reproduced, and nothing diverged either;
- same_run (exit 2): A and B are one run (the same directory, or a copy: one run id), so nothing was
  reproduced.
None of the exit-2 verdicts is ever reported as a match."""

from __future__ import annotations

import json
from collections.abc import Sequence, Set
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import is_semantic, schedule_only_applies
from .ledger import PER_TENSOR, PHASES, Ledger, differing_phases, load_step_data, read_ledger, unragged
from .schedule import describe_record

EXIT = {"identical": 0, "diverged": 1, "incomplete": 2, "invalid": 2, "different_experiments": 2, "same_run": 2}
HEAD = {
    "identical": "IDENTICAL",
    "diverged": "DIVERGED",
    "incomplete": "INCOMPLETE",
    "invalid": "INVALID LEDGER",
    "different_experiments": "NOT COMPARABLE (same hashes, different experiments)",
    "same_run": "SAME RUN (nothing was reproduced)",
}
# Fingerprint keys that differ between any two processes and say nothing about numerics.
# fingerprint keys that differ between any two processes, and between hosts of one hardware class: the
# one list of what a comparison of fingerprints ignores (verify A vs B; golden: a run vs its known-good one)
VOLATILE = frozenset({"pid", "role"})
VOLATILE_ACROSS_HOSTS = VOLATILE | {"host"}


@dataclass
class Divergence:
    iteration: int | None  # None: before any iteration (the config or the artifacts differ)
    phase: str
    detail: str
    tensors: list[str] = field(default_factory=list)
    sample: int | None = None
    position: int | None = None
    max_abs_diff: float | None = None
    other_phases: list[str] = field(default_factory=list)
    context: dict[str, Any] | None = None  # the tokens of A and B around the first differing position

    def where(self) -> str:
        return f"iteration {self.iteration}, {self.phase}" if self.iteration is not None else self.phase


@dataclass
class Verdict:
    status: str
    a: str
    b: str
    iterations: tuple[int, int]
    first: Divergence | None = None
    likely_cause: str | None = None
    config_diff: list[str] = field(default_factory=list)  # semantic keys only
    config_diff_other: list[str] = field(default_factory=list)  # keys that cannot change results
    artifact_diff: list[str] = field(default_factory=list)
    fingerprint_diff: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    table: list[dict[str, str]] = field(default_factory=list)
    shape: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # run -> per-iteration rollout shape
    schedule: dict[str, str] = field(default_factory=dict)  # run -> how its requests reached the engine

    @property
    def exit_code(self) -> int:
        return EXIT[self.status]

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"exit_code": self.exit_code}, indent=1, default=str)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def dict_diff(a: dict[str, Any], b: dict[str, Any], skip: Set[str] = frozenset()) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    out = []
    for k in sorted(set(fa) | set(fb)):
        if k.rsplit(".", 1)[-1] in skip:
            continue
        if fa.get(k, "<absent>") != fb.get(k, "<absent>"):
            out.append(f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}")
    return out


def fingerprint_diff(ha: dict[str, Any], hb: dict[str, Any], *, across_hosts: bool = False) -> list[str]:
    """Fingerprint differences of two ledger headers, role by role. `across_hosts`: also ignore the host
    name (a known-good ledger recorded on another machine of the same class)."""
    fa, fb = ha.get("fingerprints", {}), hb.get("fingerprints", {})
    skip = VOLATILE_ACROSS_HOSTS if across_hosts else VOLATILE
    out = []
    for role in sorted(set(fa) | set(fb)):
        out += [f"{role}.{d}" for d in dict_diff(fa.get(role, {}), fb.get(role, {}), skip)]
    return out


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    n = min(len(a), len(b))
    neq = np.nonzero(a[:n] != b[:n])[0] if n else np.zeros(0, dtype=int)
    if len(neq):
        return int(neq[0])
    return n if len(a) != len(b) else None


def _locate(div: Divergence, la: Ledger, lb: Ledger) -> None:
    """Refine a divergence with the per-step data both runs kept: sample, position, max |diff|."""
    it = div.iteration
    assert it is not None, "only a divergence at an iteration is located"
    if div.phase == "eval":
        div.detail = "the held-out greedy eval's tokens differ (no per-token data kept for the eval)"
        return
    if div.phase in PER_TENSOR:
        ta: dict[str, str] = dict(map(tuple, la.iterations[it]["tensors"][div.phase]))
        tb: dict[str, str] = dict(map(tuple, lb.iterations[it]["tensors"][div.phase]))
        order = [n for n, _ in la.iterations[it]["tensors"][div.phase]]
        order += [n for n in tb if n not in ta]
        div.tensors = [n for n in order if ta.get(n) != tb.get(n)]
        div.detail = f"{len(div.tensors)} of {len(order)} tensors differ"
        return
    da, db = load_step_data(la.run_dir, it), load_step_data(lb.run_dir, it)
    if da is None or db is None or div.phase not in da or div.phase not in db:
        div.detail = "hashes differ (per-step data not kept by both runs: no finer location)"
        return
    x, y = da[div.phase], db[div.phase]
    if div.phase in ("rollout_tokens", "rollout_logprobs", "trainer_logprobs", "prompts"):
        key = "prompts_len" if div.phase == "prompts" else "rollout_tokens_len"
        la_len, lb_len = da[key], db[key]
        rows_a, rows_b = unragged(x, la_len), unragged(y, lb_len)
        for s, (ra, rb) in enumerate(zip(rows_a, rows_b)):
            pos = _first_difference(ra, rb)
            if pos is not None:
                div.sample, div.position = s, pos
                break
        if div.sample is None and len(la_len) != len(lb_len):  # one run has more samples
            div.sample = min(len(la_len), len(lb_len))
    else:
        pos = _first_difference(x.reshape(-1), y.reshape(-1))
        div.sample = pos
    if x.dtype.kind == "f" and x.shape == y.shape:
        div.max_abs_diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
    where = []
    if div.sample is not None:
        where.append(f"{'prompt' if div.phase == 'prompts' else 'sample'} {div.sample}")
    if div.position is not None:
        where.append(f"token position {div.position}")
    if div.max_abs_diff is not None:
        where.append(f"max |diff| {div.max_abs_diff:.3g}")
    div.detail = ", ".join(where) or div.detail or "hashes differ"


PHASE_CAUSE = {
    "policy_weights": "the policy entering this iteration differs: the trainer's weights changed between "
    "iterations (a bit flip, memory corruption, an out-of-band write) or the weight export "
    "is not deterministic",
    "eval": "the engine's greedy answers to the held-out prompts differ for the same policy: the engine is not "
    "deterministic for these batches (or one run evaluated where the other did not: eval.every)",
    "prompts": "the data order differs: a different seed or dataset content",
    "rollout_tokens": "the rollout engine is not deterministic for the same weights and prompts: check "
    "--enable-deterministic-inference, the attention backend (flashinfer/triton, not fa3), "
    "FA3 not installed, and per-sample sampling seeds",
    "rollout_logprobs": "the engine sampled the same tokens with different log-probs: its kernels are not "
    "batch-invariant or the attention backend differs",
    "rewards": "the reward function gave different rewards for the same tokens (non-deterministic reward)",
    "advantages": "advantages differ for the same rewards (non-deterministic normalization)",
    "trainer_logprobs": "the trainer's forward pass is not deterministic: check torch deterministic algorithms, "
    "CUBLAS_WORKSPACE_CONFIG=:4096:8, NVTE_ALLOW_NONDETERMINISTIC_ALGO=0, FA3",
    "loss": "the loss differs for the same log-probs: a non-deterministic reduction",
    "grad_norm": "the backward pass is not deterministic (atomics in kernels, NCCL algorithm: NCCL_ALGO=Ring)",
    "weights": "the optimizer update differs for identical gradients, or a weight changed in memory after the step",
}


def likely_cause(
    first: Divergence,
    config_diff: list[str],
    fp_diff: list[str],
    ha: dict[str, Any],
    hb: dict[str, Any],
    artifact_diff: Sequence[str] = (),
) -> str:
    reasons = _setup_reasons(config_diff, artifact_diff, ha, hb) + _environment_reasons(fp_diff, ha, hb)
    if first.phase in ("rollout_tokens", "rollout_logprobs") and ha.get("schedule") != hb.get("schedule"):
        reasons.append(
            "run B sent its requests differently (" + describe_record(hb.get("schedule")) + "): the same "
            "requests in other batches gave other bits, so the engine is not batch-invariant"
        )
    hint = _phase_hint(first)
    return "; ".join(reasons + [hint]) if reasons else hint


def _setup_reasons(
    config_diff: list[str], artifact_diff: Sequence[str], ha: dict[str, Any], hb: dict[str, Any]
) -> list[str]:
    """What the runs were given: artifacts, semantic config, determinism off."""
    reasons = []
    if any(d.startswith("reward.") for d in artifact_diff):
        reasons.append(
            "the reward's code differs between the runs (its module's source hash changed): the same "
            "responses can be paid differently"
        )
    if artifact_diff:
        reasons.append(
            "the runs started from different artifacts (" + "; ".join(artifact_diff[:3]) + "): a cache "
            "entry changed or a hub revision moved; rebuild the cache (--refresh) or pin model.revision"
        )
    if config_diff:
        reasons.append("the two runs were configured differently in semantic keys (" + "; ".join(config_diff[:4]) + ")")
    dets = [h.get("config", {}).get("determinism", {}) for h in (ha, hb)]
    if not all(d.get("enabled", True) for d in dets):
        if all(d.get("pin_seeds") for d in dets):
            reasons.append(
                "determinism was off (determinism.enabled=false) with the sampling seeds pinned: "
                "the engine's non-deterministic kernels (batch-variant reductions) made the runs differ"
            )
        else:
            reasons.append(
                "determinism was off (determinism.enabled=false): unseeded sampling and "
                "non-deterministic kernels are expected to make runs differ"
            )
    return reasons


def _environment_reasons(fp_diff: list[str], ha: dict[str, Any], hb: dict[str, Any]) -> list[str]:
    """Where the runs ran: library versions, FA3, the determinism env, hardware and drivers."""
    reasons = []
    versions = [d for d in fp_diff if ".versions." in d]
    if versions:
        reasons.append("library versions differ between the runs: " + "; ".join(versions[:4]))
    fa3 = [d for d in fp_diff if d.split(": ")[0].endswith(".fa3")]
    for h in (ha, hb):
        for role, fp in h.get("fingerprints", {}).items():
            if fp.get("fa3") and h.get("config", {}).get("determinism", {}).get("enabled", True):
                fa3.append(f"{role} can import FA3 ({fp['fa3']})")
    if fa3:
        reasons.append(
            "FlashAttention-3 is installed ("
            + "; ".join(sorted(set(fa3))[:3])
            + "): uninstall it (pip uninstall flash_attn_3) for deterministic runs"
        )
    env = [d for d in fp_diff if ".env." in d]
    if env:
        reasons.append("the determinism env differs between runs: " + "; ".join(env[:4]))
    hw = [d for d in fp_diff if any(k in d for k in (".gpu.", ".cudnn", ".driver", "cpu_capability", ".host"))]
    if hw:
        reasons.append(
            "the runs ran on different hardware or drivers ("
            + "; ".join(hw[:4])
            + "): bitwise equality is only expected on the same stack"
        )
    other = [d for d in fp_diff if d not in versions + env + hw and ".fa3" not in d]
    if other and not reasons:
        reasons.append("the environments differ: " + "; ".join(other[:4]))
    return reasons


def _phase_hint(first: Divergence) -> str:
    hint = PHASE_CAUSE.get(first.phase, "")
    if first.phase in ("rollout_tokens", "rollout_logprobs") and (first.iteration or 0) > 0:
        hint += (
            " (iteration 0 matched: in the seed troubleshooting table, divergence after the first "
            "iteration points to FA3 still installed or the engine not receiving identical weights)"
        )
    if first.phase in PER_TENSOR and first.tensors:
        hint += f"; first tensor: {first.tensors[0]}"
    return hint


# What each iteration's rollout looked like (recorded in its stats, not hashed): shown beside the
# verdict, since a check proven only on batches that never shrink is weaker than it reads.
SHAPE_KEYS = (
    "response_len_min",
    "response_len_median",
    "response_len_max",
    "eos_fraction",
    "mean_reward",
    "nonzero_reward_fraction",
    "logprob_max_abs_diff",
    "logprob_mismatched_tokens",
)


def rollout_shapes(ledger: Ledger) -> list[dict[str, float]]:
    out = []
    for rec in ledger.iterations:
        stats = rec.get("stats") if isinstance(rec, dict) else None
        stats = stats if isinstance(stats, dict) else {}
        out.append({k: stats[k] for k in SHAPE_KEYS if isinstance(stats.get(k), (int, float))})
    return out


# What identifies an artifact's content (its path may differ between machines and says nothing).
ARTIFACT_KEYS = ("sha256", "hf_sha256", "revision", "rows", "converter_version", "dtype")


def artifact_diff(ha: dict[str, Any], hb: dict[str, Any]) -> list[str]:
    aa, ab = ha.get("artifacts", {}), hb.get("artifacts", {})
    out = []
    for name in sorted(set(aa) | set(ab)):
        out += [
            f"{name}.{d}"
            for d in dict_diff(
                {k: v for k, v in aa.get(name, {}).items() if k in ARTIFACT_KEYS},
                {k: v for k, v in ab.get(name, {}).items() if k in ARTIFACT_KEYS},
            )
        ]
    return out


def compare(a: Ledger, b: Ledger) -> Verdict:
    v = Verdict(status="identical", a=a.path, b=b.path, iterations=(len(a.iterations), len(b.iterations)))
    v.problems = [*a.problems, *b.problems]
    if a.invalid or b.invalid:
        v.status = "invalid"
        return v
    if a.header is None or b.header is None:
        v.status = "incomplete"
        return v
    v.shape = {"A": rollout_shapes(a), "B": rollout_shapes(b)}
    if "schedule" in a.header or "schedule" in b.header:  # (not recorded before ledger version 3)
        v.schedule = {"A": describe_record(a.header.get("schedule")), "B": describe_record(b.header.get("schedule"))}
    if _same_dir(a, b):
        return _one_run(v, a, "the same directory")
    det = all(schedule_only_applies(h["config"], h.get("version", 0)) for h in (a.header, b.header))
    for d in dict_diff(a.header["config"], b.header["config"]):
        (v.config_diff if is_semantic(d.split(": ", 1)[0], det) else v.config_diff_other).append(d)
    v.artifact_diff = artifact_diff(a.header, b.header)
    v.fingerprint_diff = fingerprint_diff(a.header, b.header)
    for i in range(min(len(a.iterations), len(b.iterations))):
        row = {"iteration": str(i)}
        differing = differing_phases(a.iterations[i], b.iterations[i])
        for p in PHASES:
            row[p] = "match" if p not in differing else "DIFF"
        if "eval" in a.iterations[i] or "eval" in b.iterations[i]:
            row["eval"] = "match" if "eval" not in differing else "DIFF"
        v.table.append(row)
        if differing and v.first is None:
            v.first = Divergence(iteration=i, phase=differing[0], detail="", other_phases=differing[1:])
    if v.first is None and len(a.iterations) != len(b.iterations) and not v.problems:
        n = min(len(a.iterations), len(b.iterations))
        v.first = Divergence(
            iteration=n,
            phase="iterations",
            detail=f"run A has {len(a.iterations)} iterations, run B {len(b.iterations)}",
        )
    if v.first is None and (v.artifact_diff or v.config_diff):
        what = "artifacts" if v.artifact_diff else "config"
        v.first = Divergence(
            iteration=None,
            phase=what,
            detail="every recorded hash matches, but the runs are "
            "different experiments: " + "; ".join((v.artifact_diff or v.config_diff)[:4]),
        )
    if v.first is not None and v.first.iteration is not None and v.first.phase != "iterations":
        _locate(v.first, a, b)
        v.first.context = _first_token_context(v.first, a, b)
    if v.first is not None:
        v.likely_cause = likely_cause(v.first, v.config_diff, v.fingerprint_diff, a.header, b.header, v.artifact_diff)
    if v.problems:
        v.status = "incomplete"
    elif v.first is not None and v.first.iteration is not None:
        v.status = "diverged"
    elif a.header.get("run_id") == b.header.get("run_id"):  # a copy (an edited copy diverged above)
        return _one_run(v, a, "a copy of it")
    elif v.first is not None:
        v.status = "different_experiments"
    return v


def _one_run(v: Verdict, a: Ledger, how: str) -> Verdict:
    v.status, v.first, v.likely_cause = "same_run", None, None
    v.problems.append(
        f"A and B are one run (run id {(a.header or {}).get('run_id')}; B is {how}): nothing was reproduced. "
        "Compare two runs of one config, e.g. OUT/run_a and OUT/run_b of `detrl reproduce`"
    )
    return v


def _same_dir(a: Ledger, b: Ledger) -> bool:
    try:
        return a.run_dir.resolve() == b.run_dir.resolve()
    except OSError:
        return False


TOKEN_PHASES = {
    "rollout_tokens": "rollout_tokens",
    "rollout_logprobs": "rollout_tokens",
    "trainer_logprobs": "rollout_tokens",
    "prompts": "prompts",
}


def _first_token_context(first: Divergence, a: Ledger, b: Ledger) -> dict[str, Any] | None:
    """Tokens around the first differing token of the diverging iteration: of the first phase when it
    holds tokens, else of the first later phase that does (a flipped weight shows in the rollout)."""
    if first.phase in TOKEN_PHASES:
        return token_context(first, a, b)
    phase = next((p for p in first.other_phases if p in TOKEN_PHASES), None)
    if phase is None:
        return None
    probe = Divergence(iteration=first.iteration, phase=phase, detail="")
    _locate(probe, a, b)
    ctx = token_context(probe, a, b)
    return None if ctx is None else {**ctx, "phase": phase}


def token_context(div: Divergence, a: Ledger, b: Ledger, window: int = 6) -> dict[str, Any] | None:
    """The token ids of A and B around the first differing position of the first differing sample,
    decoded one by one with run A's tokenizer when it is still on this machine."""
    key = TOKEN_PHASES.get(div.phase)
    if key is None or div.iteration is None or div.sample is None or div.position is None:
        return None
    da, db = load_step_data(a.run_dir, div.iteration), load_step_data(b.run_dir, div.iteration)
    if da is None or db is None:
        return None
    lo = max(0, div.position - window)
    ctx: dict[str, Any] = {"phase": div.phase, "sample": div.sample, "position": div.position, "from": lo}
    for run, d in (("a", da), ("b", db)):
        lens = d[f"{key}_len"]
        if div.sample >= len(lens):
            ctx[run] = []
            continue
        row = unragged(d[key], lens)[div.sample]
        ctx[run] = [int(t) for t in row[lo : div.position + window + 1]]
        if div.phase != key and div.phase in d:  # log-prob phases: the values at the differing token
            values = unragged(d[div.phase], lens)[div.sample]
            if div.position < len(values):
                ctx[f"{run}_value"] = float(values[div.position])
    tok = _tokenizer(a)
    if tok is not None:
        for run in ("a", "b"):
            ctx[f"{run}_text"] = [tok.decode([t]) for t in ctx[run]]
    return ctx


def _tokenizer(led: Ledger) -> Any:
    path = ((led.header or {}).get("artifacts", {}).get("model", {}) or {}).get("path")
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return None


def verify(dir_a: str, dir_b: str) -> Verdict:
    return compare(read_ledger(dir_a), read_ledger(dir_b))
