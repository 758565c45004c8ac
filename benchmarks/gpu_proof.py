"""The GPU proof: a profile run twice and verified, in one of four modes, with a JSON record (device,
versions, config, wall times, per-iteration rollout shape, verdict) for benchmarks/results/.

    python benchmarks/gpu_proof.py --profile gsm8k-smollm2-135m --mode MODE --out DIR --json FILE [--set k=v]

Modes: `flow` (the det-rl Prefect flow, an ephemeral server; must verify identical), `on` (the
library loop twice, determinism on; must be identical), `off` (production mode: unseeded, expected to
diverge), `pinned` (determinism off but the sampling seeds pinned: isolates the kernels), `prepare`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODE_OVERRIDES = {
    "on": [],
    "flow": [],
    "prepare": [],
    # exact on-policy needs deterministic inference, so the opposite cases run approx
    "off": ["determinism.enabled=false", "train.on_policy=approx"],
    "pinned": ["determinism.enabled=false", "determinism.pin_seeds=true", "train.on_policy=approx"],
}


def _record_pair(out: Path, record: dict, walls: dict, runs_s: float | None = None) -> int:
    """`runs_s`: the wall time of both runs together when it is not their sum (side by side)."""
    from detrl.ledger import read_ledger
    from detrl.report import format_text
    from detrl.verify import verify

    t = time.perf_counter()
    verdict = verify(str(out / "run_a"), str(out / "run_b"))
    print(format_text(verdict), flush=True)
    ledger_a = read_ledger(out / "run_a")
    record.update(
        {
            "run_wall_s": walls,
            "twice_run_s": round((sum(walls.values()) if runs_s is None else runs_s) + time.perf_counter() - t, 1),
            "verdict": verdict.status,
            "exit_code": verdict.exit_code,
            "first_divergence": None
            if verdict.first is None
            else {
                "iteration": verdict.first.iteration,
                "phase": verdict.first.phase,
                "detail": verdict.first.detail,
                "tensors": verdict.first.tensors[:5],
            },
            "likely_cause": verdict.likely_cause,
            "iterations": {n: [it["stats"] for it in read_ledger(out / n).iterations] for n in ("run_a", "run_b")},
            "engine": ledger_a.header["engine"],
            "selftest": ledger_a.header.get("selftest"),
            "workers": {k: v for k, v in ledger_a.header["fingerprints"].items() if k != "driver"},
        }
    )
    return verdict.exit_code


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gsm8k-smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--cache", default="/tmp/detrl-cache")
    ap.add_argument("--mode", choices=list(MODE_OVERRIDES), default="on")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from detrl.config import load_config
    from detrl.determinism import fingerprint
    from detrl.loop import prepare, run
    from detrl.records import progress_line

    overrides = list(a.overrides) + MODE_OVERRIDES[a.mode]
    cfg = load_config(a.profile, overrides=overrides)
    record = {
        "profile": a.profile,
        "mode": a.mode,
        "overrides": overrides,
        "command": " ".join(sys.argv),
        "device": fingerprint("driver"),
        "config": cfg.model_dump(mode="json"),
    }
    out = Path(a.out)
    if a.mode == "flow":
        os.environ["DETRL_CACHE"], os.environ["DETRL_RUNS"] = a.cache, str(out)
        from flows.detrl_flow import detrl_flow
        from tasks.state import result_of

        t = time.perf_counter()
        state = detrl_flow(profile=a.profile, overrides=list(a.overrides), return_state=True)
        data = result_of(state)
        record["flow"] = {"state": state.name, "message": state.message, "wall_s": round(time.perf_counter() - t, 1)}
        print(f"flow: {state.name}: {state.message or ''} ({record['flow']['wall_s']} s)", flush=True)
        pair = Path(data["runs"]) if data.get("runs") else sorted(out.iterdir())[-1]
        walls = {
            n: round(json.loads((pair / n / "ledger.jsonl").read_text().splitlines()[-1]).get("wall_s", 0), 1)
            for n in ("run_a", "run_b")
        }
        record["runs_dir"] = str(pair)
        record["twice"] = data.get("twice")
        code = _record_pair(pair, record, walls, data.get("runs_wall_s"))
    else:
        t = time.perf_counter()
        arts = prepare(cfg, a.cache)
        record["prepare_s"] = round(time.perf_counter() - t, 1)
        if a.mode == "prepare":
            Path(a.json).write_text(json.dumps(record, indent=1, default=str))
            print(f"prepared in {record['prepare_s']}s")
            return 0
        walls = {}
        for name in ("run_a", "run_b"):
            t = time.perf_counter()
            run(
                cfg,
                out / name,
                arts,
                progress=lambda it, n, s, name=name: print(
                    f"[{name}] {it + 1}/{n} {progress_line(s)} rollout {s['rollout_s']:.1f}s train {s['train_s']:.1f}s "
                    f"sync {s['sync_s']:.1f}s",
                    flush=True,
                ),
            )
            walls[name] = round(time.perf_counter() - t, 1)
        code = _record_pair(out, record, walls)
    Path(a.json).write_text(json.dumps(record, indent=1, default=str))
    print(
        json.dumps(
            {
                k: record.get(k)
                for k in ("profile", "mode", "verdict", "exit_code", "run_wall_s", "twice_run_s", "first_divergence")
            },
            default=str,
        )
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
