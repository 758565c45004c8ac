"""What determinism costs on a GPU, measured in one process with interleaved repeats:
- rollout: two SGLang engines on the same weights, deterministic inference on and off, alive side by
  side; the same GRPO-shaped batch (prompts x samples, seeded) alternates between them;
- train: one Megatron-core GRPO step on the same samples with PyTorch's deterministic algorithms
  (and cuDNN determinism) on and off, alternating. CUBLAS_WORKSPACE_CONFIG stays set for both, since
  cuBLAS reads it once per process.
Prints output tokens/s and step times per mode and the det/non-det ratios; writes JSON.

    python benchmarks/determinism_cost.py --json FILE [--repeats 5] [--new-tokens 512] [--set k=v]
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gsm8k-qwen2.5-0.5b-smoke")
    ap.add_argument("--json", required=True)
    ap.add_argument("--cache", default="/tmp/detrl-cache")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from detrl.config import SGLangConfig, load_config
    from detrl.data import PromptSet, read_dataset, sample_seed
    from detrl.determinism import apply_process_settings, fingerprint
    from detrl.grpo import group_advantages
    from detrl.loop import prepare
    from detrl.rollout import SamplingParams
    from detrl.rollout.sglang import SGLangEngine
    from detrl.trainer import GRPOTrainer, Sample

    cfg = load_config(a.profile, overrides=a.overrides)
    arts = prepare(cfg, a.cache)
    tok = AutoTokenizer.from_pretrained(arts.model.path)
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    batch = PromptSet(read_dataset(arts.data), tok, cfg.data, cfg.seed).batch(0, P)
    prompts = [p for p in batch.prompt_ids for _ in range(G)]
    seeds = [sample_seed(cfg.seed, 0, j, P * G) for j in range(P * G)]
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0)

    t = time.perf_counter()
    engines = {
        mode: SGLangEngine(arts.model.path, SGLangConfig(mem_fraction_static=0.22), deterministic=(mode == "det"))
        for mode in ("det", "nondet")
    }
    print(f"two engines up in {time.perf_counter() - t:.0f}s", flush=True)
    for eng in engines.values():  # warm-up at the measured shape (JIT, graphs, the allocator), not timed
        eng.generate(prompts, seeds, params)
    tps: dict[str, list[float]] = {"det": [], "nondet": []}
    gens = None
    for r in range(a.repeats):
        for mode in ("det", "nondet") if r % 2 == 0 else ("nondet", "det"):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = engines[mode].generate(prompts, seeds, params)
            dt = time.perf_counter() - t
            tps[mode].append(sum(len(g.token_ids) for g in out) / dt)
            print(f"rollout {mode} repeat {r}: {tps[mode][-1]:.0f} tok/s ({dt:.1f}s)", flush=True)
            if mode == "det":
                gens = out
    for eng in engines.values():
        eng.shutdown()
    torch.cuda.empty_cache()

    n = min(a.train_samples, len(gens))
    rewards = [float(i % 2) for i in range(n)]
    adv = group_advantages(rewards, G).tolist()
    samples = [Sample(list(prompts[i]), gens[i].token_ids, adv[i]) for i in range(n)]
    tokens = [sum(len(s.response_ids) for s in samples)]
    step: dict[str, list[float]] = {"det": [], "nondet": []}
    trainer = GRPOTrainer(cfg, arts.model.path, str(Path(arts.megatron.path) / "weights"))
    for mode in ("det", "nondet"):  # warm-up, not timed: each mode selects its own kernels
        apply_process_settings(mode == "det", cfg.seed)
        trainer.train_step(samples, tokens)
    for r in range(a.repeats):
        for mode in ("det", "nondet") if r % 2 == 0 else ("nondet", "det"):
            apply_process_settings(mode == "det", cfg.seed)
            torch.cuda.synchronize()
            t = time.perf_counter()
            trainer.train_step(samples, tokens)
            torch.cuda.synchronize()
            step[mode].append(time.perf_counter() - t)
            print(f"train {mode} repeat {r}: {step[mode][-1]:.2f}s", flush=True)
    trainer.close()

    med = lambda xs: statistics.median(xs)
    result = {
        "device": fingerprint("bench")["gpu"],
        "profile": a.profile,
        "repeats": a.repeats,
        "rollout": {
            "batch": f"{P}x{G}",
            "new_tokens": a.new_tokens,
            "tok_s": tps,
            "det_over_nondet_throughput": med(tps["det"]) / med(tps["nondet"]),
        },
        "train": {
            "samples": n,
            "tokens": tokens[0],
            "step_s": step,
            "nondet_over_det_time": med(step["nondet"]) / med(step["det"]),
        },
    }
    print(
        f"rollout throughput det/non-det: {result['rollout']['det_over_nondet_throughput']:.3f} "
        f"({med(tps['det']):.0f} vs {med(tps['nondet']):.0f} tok/s)"
    )
    print(
        f"train speed det/non-det (non-det time / det time): {result['train']['nondet_over_det_time']:.3f} "
        f"({med(step['det']):.2f}s vs {med(step['nondet']):.2f}s)"
    )
    Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
