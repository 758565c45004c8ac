"""Wall time of the whole twice-run (two loop runs + verify), one after the other and side by side, and
the cost of hashing as a fraction of step time, measured in one process on this machine.

    python benchmarks/twice_run.py [--profile tiny-cpu] [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def hashing_cost_per_step(artifacts, cfg, repeats: int = 5) -> float:
    """Seconds of hashing one step does: the exported policy (trainer side), the same tensors as
    the engine holds them (engine side), the trainer's weights after the step, and the per-phase
    arrays of a batch of this shape."""
    from detrl.ledger import array_sha256, ragged_sha256
    from detrl.megatron.checkpoint import load_hf_state
    from detrl.tensor_hash import tensor_digests

    state = {k: v.float() for k, v in load_hf_state(artifacts.model.path).items()}
    n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    toks = [np.arange(cfg.rollout.max_new_tokens) for _ in range(n)]
    lps = [np.zeros(cfg.rollout.max_new_tokens, np.float32) for _ in range(n)]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(3):  # policy export, engine-held copy, weights after the step
            tensor_digests(state, cfg.ledger.tensor_hash)
        ragged_sha256(toks, np.int64), ragged_sha256(lps, np.float32), ragged_sha256(lps, np.float32)
        array_sha256(np.zeros(n, np.float32)), array_sha256(np.zeros(n, np.float32))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny-cpu")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "detrl-bench-cache"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from detrl import twice
    from detrl.config import load_config
    from detrl.ledger import read_ledger
    from detrl.loop import prepare, run
    from detrl.ray.session import shared_ray
    from detrl.verify import verify

    cfg = load_config(a.profile, overrides=a.overrides)
    out = Path(a.out or tempfile.mkdtemp(prefix="detrl-bench-"))
    t0 = time.perf_counter()
    arts = prepare(cfg, a.cache)
    t_prep = time.perf_counter() - t0
    walls: dict[str, float] = {}
    for mode in ("sequential", "side_by_side"):  # both schedules in one invocation: their ratio
        d = out / mode
        t = time.perf_counter()
        twice.run_both(
            lambda d=d: run(cfg, d / "run_a", arts), lambda d=d: run(cfg, d / "run_b", arts), mode, hold=shared_ray(cfg)
        )
        walls[mode] = time.perf_counter() - t
    t = time.perf_counter()
    verdicts = {m: verify(str(out / m / "run_a"), str(out / m / "run_b")).status for m in walls}
    verdicts["across"] = verify(str(out / "sequential" / "run_a"), str(out / "side_by_side" / "run_b")).status
    t_verify = (time.perf_counter() - t) / 3
    steps = [it["stats"]["step_s"] for n in ("run_a", "run_b") for it in read_ledger(out / "sequential" / n).iterations]
    hash_s = hashing_cost_per_step(arts, cfg)
    step = statistics.median(steps)
    result = {
        "profile": a.profile,
        "verdicts": verdicts,
        "prepare_s": round(t_prep, 2),
        "twice_run_s": {m: round(w + t_verify, 2) for m, w in walls.items()},
        "side_by_side_speedup": round(walls["sequential"] / walls["side_by_side"], 3),
        "verify_s": round(t_verify, 3),
        "median_step_s": round(step, 3),
        "hash_per_step_s": round(hash_s, 4),
        "hash_fraction_of_step": round(hash_s / step, 4),
    }
    print(f"profile {a.profile}: verdicts {verdicts}")
    print(f"prepare (download/generate + convert, cached after the first time): {t_prep:.2f}s")
    print(
        f"twice-run: sequential {result['twice_run_s']['sequential']}s, side by side "
        f"{result['twice_run_s']['side_by_side']}s ({result['side_by_side_speedup']}x)"
    )
    print(f"median step {step:.3f}s; hashing per step {hash_s * 1000:.1f} ms = {100 * hash_s / step:.2f}% of a step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
