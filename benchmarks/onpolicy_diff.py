"""Exact on-policy, measured on one batch in one process (`detrl.onpolicy` says what is matched):

1. the rollout engine samples a GRPO-shaped batch, and scores it by prefill (the exact mode's
   log-probs); its decode log-probs are kept beside them;
2. the trainer in exact mode scores the same samples: mismatched tokens against the prefill (0 is the
   claim), and, for the opposite cases, against the decode log-probs and from a trainer in approx mode;
3. the layer diagnostic: one sample through both sides with every op's output recorded
   (`onpolicy.op_names`), naming the first op whose outputs differ (SGLang's side is saved by det-rl's
   plugin under DETRL_SGLANG_DUMP);
4. `--cost`: what exact costs, side by side: the rollout with and without the scoring prefill
   (tokens/s), and a train step with the engine's kernels against approx's (tokens/s), interleaved;
   then one profiled train step of each, its GPU time by op.

    python benchmarks/onpolicy_diff.py --profile gsm8k-smollm2-135m --json FILE [--set k=v] [--cost]
    python benchmarks/onpolicy_diff.py --profile tiny-cpu --set rollout.hf.attn_implementation=sdpa

Exit 0 when the exact trainer reproduces every prefill log-prob and every op's output, 1 otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gsm8k-smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--cache", default=os.environ.get("DETRL_CACHE", str(Path.home() / ".detrl" / "cache")))
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default: the profile's prompts_per_step)")
    ap.add_argument("--cost", action="store_true", help="also time exact against approx")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()

    import numpy as np
    import torch

    from detrl import onpolicy
    from detrl.config import load_config
    from detrl.data import sample_seed
    from detrl.determinism import apply_process_settings, fingerprint
    from detrl.grpo import group_advantages
    from detrl.loop import Step, prepare
    from detrl.rollout import make_engine
    from detrl.rollout import sglang_plugin as plugin
    from detrl.trainer import GRPOTrainer, Sample

    cfg = load_config(a.profile, overrides=[*a.overrides, "train.on_policy=exact"])
    approx_cfg = load_config(a.profile, overrides=[*a.overrides, "train.on_policy=approx"])
    apply_process_settings(True, cfg.seed)
    arts = prepare(cfg, a.cache)
    sglang = cfg.backends.rollout == "sglang"
    dump = Path(tempfile.mkdtemp(prefix="detrl-onpolicy-dump-"))
    if sglang:
        os.environ[plugin.DUMP_ENV] = str(dump)
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "profile": a.profile,
        "overrides": a.overrides,
        "device": fingerprint("bench"),
    }

    step = Step(cfg, arts, ())
    P = a.prompts or cfg.rollout.prompts_per_step
    G = cfg.rollout.samples_per_prompt
    batch = step.prompts.batch(0, P)
    prompts = [list(p) for p in batch.prompt_ids for _ in range(G)]
    seeds = [sample_seed(cfg.sampling_seed, 0, j, P * G) for j in range(P * G)]

    t = time.perf_counter()
    engine: Any = make_engine(cfg, arts.model.path)
    record["engine_start_s"] = round(time.perf_counter() - t, 1)
    engine.prefill_logprobs = False  # decode log-probs first, then the prefill's explicitly
    gens = engine.generate(prompts, seeds, step.params)
    decode = [np.asarray(g.logprobs, np.float32) for g in gens]
    prefill = [np.asarray(x, np.float32) for x in _score(engine, prompts, [g.token_ids for g in gens])]
    answers = [x for x in batch.answers for _ in range(G)]
    rewards = [step.reward.score(g.token_ids, y, {}) for g, y in zip(gens, answers)]
    adv = group_advantages(rewards, G).tolist()
    samples = [Sample(p, g.token_ids, adv[i], prefill[i].tolist()) for i, (p, g) in enumerate(zip(prompts, gens))]
    tokens = sum(len(s.response_ids) for s in samples)
    print(f"{len(samples)} samples, {tokens} response tokens", flush=True)

    weights = str(Path(arts.megatron.path) / "weights")
    exact = GRPOTrainer(cfg, arts.model.path, weights)
    got = exact.score(samples)
    checks = {
        "exact trainer vs engine prefill": onpolicy.mismatch(prefill, got),
        "exact trainer vs engine decode": onpolicy.mismatch(decode, got),
        "engine prefill vs engine decode": onpolicy.mismatch(decode, prefill),
    }
    approx = GRPOTrainer(approx_cfg, arts.model.path, weights)
    checks["approx trainer vs engine prefill"] = onpolicy.mismatch(prefill, approx.score(samples))
    record["checks"] = {}
    for name, m in checks.items():
        record["checks"][name] = {**m.stats(), "tokens": m.total, "first": m.first}
        print(f"{name}: {m.tokens} of {m.total} tokens differ, max |diff| {m.max_abs_diff:.3g}", flush=True)

    # the layer diagnostic on the first sample with a response
    i = next(k for k, s in enumerate(samples) if s.response_ids)
    layers = len(exact.model.decoder.layers)
    ops = onpolicy.op_names(layers)
    mine: dict[str, Any] = {}
    undo = onpolicy.capture_megatron(exact.model, mine)
    mine["logprobs"] = torch.from_numpy(exact.score([samples[i]])[0])
    undo()
    theirs = _engine_ops(engine, prompts[i], samples[i].response_ids, sglang, dump)
    diff = onpolicy.first_difference(theirs, mine, ops)
    record["layer_diff"] = {"sample": i, "op": diff.op, "compared": len(diff.compared), "describe": diff.describe()}
    print(f"layer diagnostic, sample {i}: {diff.describe()}", flush=True)
    approx_ops: dict[str, Any] = {}
    undo = onpolicy.capture_megatron(approx.model, approx_ops)
    approx_ops["logprobs"] = torch.from_numpy(approx.score([samples[i]])[0])
    undo()
    other = onpolicy.first_difference(theirs, approx_ops, ops)
    record["layer_diff_approx"] = {"op": other.op, "describe": other.describe()}
    print(f"layer diagnostic, approx trainer: {other.describe()}", flush=True)

    if a.cost:
        record["cost"] = _cost(engine, exact, approx, prompts, seeds, step.params, samples, a.repeats)
        _save(a.json, record)  # the figures first: the profile below is long, and a stopped job keeps them
        total = [sum(len(s.response_ids) for s in samples)]
        record["cost"]["train_ops"] = {
            m: _top_ops(lambda t=t: t.train_step(samples, total)) for m, t in (("approx", approx), ("exact", exact))
        }
    engine.shutdown()
    _save(a.json, record)
    ok = checks["exact trainer vs engine prefill"].tokens == 0 and diff.op is None
    print("EXACT" if ok else "NOT EXACT", flush=True)
    return 0 if ok else 1


def _score(engine: Any, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
    if hasattr(engine, "score") and engine.__class__.__name__ == "SGLangEngine":
        return engine.score(prompts, responses)
    return [engine.score(p, r) for p, r in zip(prompts, responses)]


def _engine_ops(engine: Any, prompt: list[int], response: list[int], sglang: bool, dump: Path) -> dict[str, Any]:
    import torch

    from detrl import onpolicy

    if not sglang:
        ops: dict[str, Any] = {}
        undo = onpolicy.capture_hf(engine.model, ops)
        ops["logprobs"] = torch.tensor(engine.score(prompt, response), dtype=torch.float32)
        undo()
        return ops
    from detrl.rollout import sglang_plugin as plugin

    before = set(dump.glob("*.pt"))
    armed = dump / plugin.ARMED
    armed.touch()  # the plugin saves forwards only now: one sequence, not every batch
    try:
        lp = engine.score([prompt], [response])[0]
    finally:
        armed.unlink()
    new = sorted(set(dump.glob("*.pt")) - before)
    if not new:
        raise SystemExit(f"SGLang saved no activations under {dump} (is det-rl's plugin loaded?)")
    ops = torch.load(new[-1])
    ids = ops.pop("input_ids")
    if ids.tolist() != prompt + response:
        raise SystemExit("the saved forward is not the scored sequence alone")
    ops["logprobs"] = torch.tensor(lp, dtype=torch.float32)
    return ops


def _save(path: str | None, record: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=1, default=str))


def _cost(
    engine: Any, exact: Any, approx: Any, prompts: Any, seeds: Any, params: Any, samples: Any, repeats: int
) -> dict[str, Any]:
    """Interleaved: rollout without and with the scoring prefill; a train step with each trainer."""
    import torch

    tok: dict[str, list[float]] = {"rollout_approx": [], "rollout_exact": [], "train_approx": [], "train_exact": []}
    secs: dict[str, list[float]] = {k: [] for k in tok}
    total = [sum(len(s.response_ids) for s in samples)]
    train_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    for r in range(repeats + 1):  # the first round warms up, not recorded
        for mode in ("approx", "exact") if r % 2 else ("exact", "approx"):
            engine.prefill_logprobs = mode == "exact"
            torch.cuda.synchronize()
            t = time.perf_counter()
            gens = engine.generate(prompts, seeds, params)
            dt = time.perf_counter() - t
            if r:
                secs[f"rollout_{mode}"].append(dt)
                tok[f"rollout_{mode}"].append(sum(len(g.token_ids) for g in gens) / dt)
            trainer = exact if mode == "exact" else approx
            torch.cuda.synchronize()
            t = time.perf_counter()
            trainer.train_step(samples, total)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            if r:
                secs[f"train_{mode}"].append(dt)
                tok[f"train_{mode}"].append(train_tokens / dt)
            print(
                f"cost round {r} {mode}: rollout {secs.get(f'rollout_{mode}', [0])[-1:]} s, train {dt:.2f} s",
                flush=True,
            )
    med = statistics.median
    out: dict[str, Any] = {
        "repeats": repeats,
        "tokens_per_s": {k: med(v) for k, v in tok.items()},
        "seconds": {k: med(v) for k, v in secs.items()},
    }
    it = {m: out["seconds"][f"rollout_{m}"] + out["seconds"][f"train_{m}"] for m in ("approx", "exact")}
    out["rollout_plus_train_s"] = it
    out["exact_over_approx_time"] = it["exact"] / it["approx"]
    print(json.dumps(out), flush=True)
    return out


def _top_ops(step: Any, top: int = 15) -> list[dict[str, Any]]:
    """Where one train step's GPU time goes: the ops with the most self CUDA time (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:top]
    out = [
        {
            "op": e.key[:80],
            "calls": e.count,
            "self_cuda_ms": round(e.self_device_time_total / 1e3, 1),
            "cpu_total_ms": round(e.cpu_time_total / 1e3, 1),
        }
        for e in rows
    ]
    print(json.dumps(out[:8]), flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
