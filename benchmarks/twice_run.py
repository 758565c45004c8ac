"""Wall time of the whole twice-run (two loop runs + verify) and the cost of hashing as a fraction of
step time, measured in one process on this machine.

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
    from detrl.ledger import array_sha256, ragged_sha256, tensor_digests
    from detrl.megatron.checkpoint import load_hf_state

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

    from detrl.config import load_config
    from detrl.ledger import read_ledger
    from detrl.loop import prepare, run
    from detrl.verify import verify

    cfg = load_config(a.profile, overrides=a.overrides)
    out = Path(a.out or tempfile.mkdtemp(prefix="detrl-bench-"))
    t0 = time.perf_counter()
    arts = prepare(cfg, a.cache)
    t_prep = time.perf_counter() - t0
    walls = []
    for name in ("run_a", "run_b"):
        t = time.perf_counter()
        run(cfg, out / name, arts)
        walls.append(time.perf_counter() - t)
    t = time.perf_counter()
    verdict = verify(str(out / "run_a"), str(out / "run_b"))
    t_verify = time.perf_counter() - t
    steps = [it["stats"]["step_s"] for n in ("run_a", "run_b") for it in read_ledger(out / n).iterations]
    hash_s = hashing_cost_per_step(arts, cfg)
    step = statistics.median(steps)
    result = {
        "profile": a.profile,
        "verdict": verdict.status,
        "prepare_s": round(t_prep, 2),
        "run_a_s": round(walls[0], 2),
        "run_b_s": round(walls[1], 2),
        "verify_s": round(t_verify, 3),
        "twice_run_s": round(sum(walls) + t_verify, 2),
        "median_step_s": round(step, 3),
        "hash_per_step_s": round(hash_s, 4),
        "hash_fraction_of_step": round(hash_s / step, 4),
    }
    print(f"profile {a.profile}: verdict {verdict.status}")
    print(f"prepare (download/generate + convert, cached after the first time): {t_prep:.2f}s")
    print(f"run A {walls[0]:.2f}s, run B {walls[1]:.2f}s, verify {t_verify:.3f}s -> twice-run {result['twice_run_s']}s")
    print(f"median step {step:.3f}s; hashing per step {hash_s * 1000:.1f} ms = {100 * hash_s / step:.2f}% of a step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
