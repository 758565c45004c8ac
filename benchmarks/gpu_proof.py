"""The GPU proof: a profile run twice with determinism on (must verify identical) and, with --off, twice
with it off (expected to diverge); writes a JSON record (device, versions, config, wall times,
verdicts) for benchmarks/results/.

    python benchmarks/gpu_proof.py --profile gsm8k-qwen2.5-0.5b-smoke --out DIR --json FILE [--off] [--set k=v]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gsm8k-qwen2.5-0.5b-smoke")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--cache", default="/tmp/detrl-cache")
    ap.add_argument("--mode", choices=["on", "off", "prepare"], default="on")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from detrl.config import load_config
    from detrl.determinism import fingerprint
    from detrl.ledger import read_ledger
    from detrl.loop import prepare, run
    from detrl.verify import format_text, verify

    overrides = list(a.overrides) + (["determinism.enabled=false"] if a.mode == "off" else [])
    cfg = load_config(a.profile, overrides=overrides)
    t = time.perf_counter()
    arts = prepare(cfg, a.cache)
    record = {"profile": a.profile, "mode": a.mode, "overrides": overrides, "prepare_s": round(time.perf_counter() - t, 1),
              "device": fingerprint("driver"), "config": cfg.model_dump(mode="json")}
    if a.mode == "prepare":
        Path(a.json).write_text(json.dumps(record, indent=1))
        print(f"prepared in {record['prepare_s']}s")
        return 0
    out = Path(a.out)
    walls = {}
    for name in ("run_a", "run_b"):
        t = time.perf_counter()
        run(cfg, out / name, arts, progress=lambda it, n, s, name=name: print(
            f"[{name}] {it + 1}/{n} reward {s['mean_reward']:.3f} len {s['mean_response_len']:.0f} "
            f"rollout {s['rollout_s']:.1f}s train {s['train_s']:.1f}s sync {s['sync_s']:.1f}s "
            f"|lp diff| {s['logprob_max_abs_diff']:.3g}", flush=True))
        walls[name] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    verdict = verify(str(out / "run_a"), str(out / "run_b"))
    print(format_text(verdict), flush=True)
    record.update({
        "run_wall_s": walls, "twice_run_s": round(sum(walls.values()) + time.perf_counter() - t, 1),
        "verdict": verdict.status, "exit_code": verdict.exit_code,
        "first_divergence": None if verdict.first is None else {
            "iteration": verdict.first.iteration, "phase": verdict.first.phase, "detail": verdict.first.detail},
        "likely_cause": verdict.likely_cause,
        "iterations": {n: [it["stats"] for it in read_ledger(out / n).iterations] for n in ("run_a", "run_b")},
        "engine": read_ledger(out / "run_a").header["engine"],
        "workers": {k: v for k, v in read_ledger(out / "run_a").header["fingerprints"].items() if k != "driver"},
    })
    Path(a.json).write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({k: record[k] for k in ("profile", "mode", "verdict", "exit_code", "run_wall_s", "twice_run_s")}))
    return verdict.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
