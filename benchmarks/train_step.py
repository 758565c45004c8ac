"""The train step at the reference shape, measured in one process with interleaved repeats: micro-
batches by count (4 samples, with Megatron's local attention: the baseline) against micro-batches by
padded tokens (`train.micro_batch_tokens`) with each attention (`train.attention`: local, sdpa), each
with determinism on and off. The samples have the response lengths
of a real model (SmolLM2-135M on GSM8K: 39 % run to the 1024-token cap, the rest end between 13 and
1023), so padding waste is what a real run sees. Prints step time, tokens/s, the det/non-det ratio
and MFU (useful FLOPs over the bf16 dense peak, 989 TFLOPS on H100 and H200); writes JSON.

    python benchmarks/train_step.py --json FILE [--budgets 8192,16384] [--attention local,sdpa] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it once per process

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16 = 989e12


def samples(n: int, seed: int = 0) -> list:
    import numpy as np

    from detrl.trainer import Sample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(100, 150000, int(rng.integers(80, 200))).tolist()
        length = 1024 if rng.random() < 0.39 else int(rng.integers(13, 1024))
        out.append(Sample(prompt, rng.integers(100, 150000, length).tolist(), 1.0 if i % 2 else -1.0))
    return out


def useful_flops(meta, batch: list) -> float:
    """Forward + backward of the real (unpadded) tokens: 6 x non-embedding params per token, the output
    layer for response tokens only (det-rl projects nothing else), causal attention."""
    h, layers, per_layer = meta.hidden_size, meta.num_layers, meta.params_per_layer
    total = 0.0
    for s in batch:
        t, r = len(s.prompt_ids) + len(s.response_ids), len(s.response_ids)
        total += 6 * layers * per_layer * t + 6 * meta.vocab_size * h * r + 6 * layers * h * t * t
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gsm8k-qwen2.5-0.5b-smoke")
    ap.add_argument("--json", required=True)
    ap.add_argument("--cache", default="/tmp/detrl-cache")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", default="8192,16384")
    ap.add_argument("--attention", default="local,sdpa")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    import torch

    from detrl.config import load_config
    from detrl.determinism import apply_process_settings, fingerprint
    from detrl.ledger import combine
    from detrl.loop import prepare
    from detrl.megatron.names import ArchMeta
    from detrl.trainer import GRPOTrainer, micro_batches

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    base = load_config(a.profile, overrides=a.overrides)
    arts = prepare(base, a.cache)
    meta = ArchMeta.from_hf_dir(arts.model.path)
    n = base.rollout.prompts_per_step * base.rollout.samples_per_prompt
    batch = samples(n)
    tokens = [sum(len(s.response_ids) for s in batch)]
    flops = useful_flops(meta, batch)
    variants = {"count-local": (None, "local")}
    for b in a.budgets.split(","):
        for attention in a.attention.split(","):
            variants[f"tokens{b}-{attention}"] = (int(b), attention)
    ckpt = str(Path(arts.megatron.path) / "weights")
    trainers, padded = {}, {}
    for name, (budget, attention) in variants.items():
        extra = [f"train.micro_batch_tokens={budget or 'null'}", f"train.attention={attention}"]
        cfg = load_config(a.profile, overrides=[*a.overrides, *extra])
        groups = micro_batches(batch, cfg.train)
        lens = [len(s.prompt_ids) + len(s.response_ids) for s in batch]
        padded[name] = {
            "micro_batches": len(groups),
            "padded_tokens": sum(len(g) * max(lens[i] for i in g) for _, g in groups),
        }
        trainers[name] = GRPOTrainer(cfg, arts.model.path, ckpt)
    times: dict[str, list[float]] = {f"{v}/{m}": [] for v in variants for m in ("det", "nondet")}
    logprobs, first = {}, {}
    for r in range(a.repeats + 1):  # the first round warms up every variant
        for key in times:
            name, mode = key.split("/")
            apply_process_settings(mode == "det", base.seed)
            sync()
            t = time.perf_counter()
            res = trainers[name].train_step(batch, tokens)
            sync()
            if r:
                times[key].append(time.perf_counter() - t)
            elif mode == "det":
                logprobs[name] = res.logprobs
                first[name] = combine(trainers[name].weight_hashes())
            print(f"round {r} {key}: {time.perf_counter() - t:.2f}s", flush=True)
    # determinism, measured: a fresh trainer's first step (determinism on) ends on the same bits
    apply_process_settings(True, base.seed)
    rerun = {}
    for name, trainer in trainers.items():
        again = GRPOTrainer(trainer.cfg, arts.model.path, ckpt)
        res = again.train_step(batch, tokens)
        same_lp = all((x == y).all() for x, y in zip(res.logprobs, logprobs[name]))
        rerun[name] = same_lp and combine(again.weight_hashes()) == first[name]
        del again, res
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"rerun {name}: bitwise {rerun[name]}", flush=True)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
    rows = {}
    for key, ts in times.items():
        s = statistics.median(ts)
        rows[key] = {"step_s": s, "tokens_per_s": real / s, "mfu": flops / s / PEAK_BF16}
    ref = logprobs["count-local"]
    out = {
        "profile": a.profile,
        "device": fingerprint("driver")["gpu"],
        "samples": n,
        "real_tokens": real,
        "response_tokens": tokens[0],
        "useful_tflops_per_step": flops / 1e12,
        "padding": padded,
        "median_of": a.repeats,
        "rows": rows,
        "det_over_nondet": {v: rows[f"{v}/nondet"]["step_s"] / rows[f"{v}/det"]["step_s"] for v in variants},
        "speedup_over_count_det": {v: rows["count-local/det"]["step_s"] / rows[f"{v}/det"]["step_s"] for v in variants},
        "first_step_bitwise_on_rerun": rerun,
        "logprob_max_abs_diff_vs_count": {
            v: float(max(abs(x - y).max() for x, y in zip(ref, lp))) for v, lp in logprobs.items()
        },
    }
    Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    print(
        json.dumps(
            {
                k: out[k]
                for k in (
                    "padding",
                    "rows",
                    "det_over_nondet",
                    "speedup_over_count_det",
                    "logprob_max_abs_diff_vs_count",
                    "first_step_bitwise_on_rerun",
                )
            },
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
