"""What determinism costs on a GPU, measured in one process with interleaved repeats:
- rollout: two SGLang engines on the same weights, deterministic inference on and off, alive side by
  side; the same GRPO-shaped batch (prompts x samples, seeded) alternates between them;
- train: one Megatron-core GRPO step on the same samples with PyTorch's deterministic algorithms
  (and cuDNN determinism) on and off, alternating. CUBLAS_WORKSPACE_CONFIG stays set for both, since
  cuBLAS reads it once per process.
Prints output tokens/s and step times per mode and the det/non-det ratios; writes JSON.

`--knobs` splits the rollout cost: an engine with the two switches SGLang's deterministic mode makes to
the server (the pytorch sampler; no radix cache with flashinfer) but none of its kernels, an engine with
the triton attention backend (whose deterministic mode keeps the radix cache), and the model's GEMMs
with SGLang's batch-invariant matmul against cuBLAS. (Six engines, one per switch, took 369 s to
start on an H200 with empty caches and did not finish in a 600 s call.) `--variant
NAME:det=1,key=value,...` adds any engine: `sgl.Engine` arguments, or det-rl's own `rollout.sglang` keys
(`det+sglang_kernels:det=1,kernels=sglang` is SGLang's deterministic mode without det-rl's kernels).

    python benchmarks/determinism_cost.py --json FILE [--repeats 5] [--new-tokens 512] [--set k=v]
        [--knobs] [--variant ...] [--no-train]
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KNOBS = (
    "nondet+pytorch_sampler+no_radix:det=0,sampling_backend=pytorch,disable_radix_cache=1",
    "det+triton:det=1,attention_backend=triton",
)


def parse_variant(text: str) -> tuple[str, bool, dict[str, Any]]:
    """'NAME:det=1,key=value' -> (name, deterministic, sgl.Engine arguments)."""
    name, _, spec = text.partition(":")
    args: dict[str, Any] = {}
    for kv in filter(None, spec.split(",")):
        k, _, v = kv.partition("=")
        args[k] = bool(int(v)) if v in ("0", "1") else v
    return name, bool(args.pop("det", False)), args


def forward_gemm_times(
    linears: dict[str, Callable[[Any, Any], Any]],
    shapes: list[tuple[int, int]],
    head: tuple[int, int],
    layers: int,
    tokens: int,
    repeats: int = 20,
) -> dict[str, float]:
    """Median seconds of one forward's GEMMs (`layers` x the (in, out) `shapes`, then the `head`; bf16,
    random operands, `tokens` rows) per linear `f(x, weight[out, in])`, each captured in a CUDA graph as
    SGLang decodes (launch overhead does not count) and replayed interleaved."""
    import torch

    dev, bf = "cuda", torch.bfloat16
    weights = {s: torch.randn(s[1], s[0], device=dev, dtype=bf) for s in [*shapes, head]}
    xs = {i: torch.randn(tokens, i, device=dev, dtype=bf) for i, _ in [*shapes, head]}

    def forward(linear: Callable[[Any, Any], Any]) -> None:
        for _ in range(layers):
            for s in shapes:
                linear(xs[s[0]], weights[s])
        linear(xs[head[0]], weights[head])

    graphs = {}
    for name, linear in linears.items():
        forward(linear)  # JIT and autotune before capture
        torch.cuda.synchronize()
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            forward(linear)
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for r in range(repeats):
        for name in list(graphs) if r % 2 == 0 else list(graphs)[::-1]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            graphs[name].replay()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def gemm_cost(model_dir: str, tokens: tuple[int, ...] = (64, 256, 8192), repeats: int = 20) -> dict[str, Any]:
    """The model's GEMMs of one forward at decode- and prefill-sized token counts: SGLang's batch-invariant
    matmul (the kernel its deterministic mode puts behind aten::mm) against cuBLAS."""
    import torch.nn.functional as F
    from sglang.srt.batch_invariant_ops import matmul_persistent

    from detrl.megatron.names import ArchMeta

    m = ArchMeta.from_hf_dir(model_dir)
    h, f, kv = m.hidden_size, m.ffn_hidden_size, m.num_kv_heads * m.head_dim
    shapes = [(h, h + 2 * kv), (h, h), (h, 2 * f), (f, h)]  # (in, out): qkv, o, gate_up, down
    linears = {"batch_invariant": lambda x, w: matmul_persistent(x, w.t()), "cublas": F.linear}
    out: dict[str, Any] = {}
    for n in tokens:
        med = forward_gemm_times(linears, shapes, (h, m.vocab_size), m.num_layers, n, repeats)
        out[str(n)] = {"s": med, "cublas_over_batch_invariant_time": med["cublas"] / med["batch_invariant"]}
        print(
            f"GEMMs of one forward at {n} tokens: batch-invariant {med['batch_invariant'] * 1e3:.2f} ms, "
            f"cuBLAS {med['cublas'] * 1e3:.2f} ms ({out[str(n)]['cublas_over_batch_invariant_time']:.3f})",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gsm8k-qwen2.5-0.5b-smoke")
    ap.add_argument("--json", required=True)
    ap.add_argument("--cache", default="/tmp/detrl-cache")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--knobs", action="store_true", help="also the engines of KNOBS and the GEMM timing")
    ap.add_argument("--variant", dest="variants", action="append", default=[], help="NAME:det=1,key=value")
    ap.add_argument("--no-train", action="store_true")
    a = ap.parse_args()
    variants = [parse_variant(v) for v in ["det:det=1", "nondet:det=0", *(KNOBS if a.knobs else ()), *a.variants]]

    import torch
    from transformers import AutoTokenizer

    from detrl.config import SGLangConfig, load_config
    from detrl.data import PromptSet, read_dataset, sample_seed
    from detrl.determinism import fingerprint
    from detrl.loop import prepare
    from detrl.rollout import SamplingParams
    from detrl.rollout.sglang import SGLangEngine

    cfg = load_config(a.profile, overrides=a.overrides)
    arts = prepare(cfg, a.cache)
    tok = AutoTokenizer.from_pretrained(arts.model.path)
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    batch = PromptSet(read_dataset(arts.data), tok, cfg.data, cfg.seed).batch(0, P)
    prompts = [p for p in batch.prompt_ids for _ in range(G)]
    seeds = [sample_seed(cfg.seed, 0, j, P * G) for j in range(P * G)]
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0)

    t = time.perf_counter()
    sgl = SGLangConfig(mem_fraction_static=min(0.22, 0.8 / len(variants)))
    engines = {}
    for name, det, args in variants:
        own = {k: args[k] for k in args if k in SGLangConfig.model_fields}  # det-rl's keys, e.g. kernels=sglang
        engine_args = {k: v for k, v in args.items() if k not in own}
        engines[name] = SGLangEngine(
            arts.model.path, sgl.model_copy(update=own), deterministic=det, engine_args=engine_args
        )
        print(f"engine {name} up at {time.perf_counter() - t:.0f}s", flush=True)
    for eng in engines.values():  # warm-up at the measured shape (JIT, graphs, the allocator), not timed
        eng.generate(prompts, seeds, params)
    tps: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, set[str]] = {name: set() for name in engines}
    gens = None
    for r in range(a.repeats):
        for mode in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = engines[mode].generate(prompts, seeds, params)
            dt = time.perf_counter() - t
            tps[mode].append(sum(len(g.token_ids) for g in out) / dt)
            outputs[mode].add(hashlib.sha256(repr([g.token_ids for g in out]).encode()).hexdigest())
            print(f"rollout {mode} repeat {r}: {tps[mode][-1]:.0f} tok/s ({dt:.1f}s)", flush=True)
            if mode == "det":
                gens = out
    for eng in engines.values():
        eng.shutdown()
    torch.cuda.empty_cache()
    med = statistics.median
    rollout: dict[str, Any] = {
        "batch": f"{P}x{G}",
        "new_tokens": a.new_tokens,
        "engines": {name: {"deterministic": det, **args} for name, det, args in variants},
        "tok_s": tps,
        "det_over_nondet_throughput": med(tps["det"]) / med(tps["nondet"]),
        "over_nondet_throughput": {name: med(v) / med(tps["nondet"]) for name, v in tps.items()},
        "distinct_outputs_over_repeats": {name: len(h) for name, h in outputs.items()},
    }
    for name, ratio in rollout["over_nondet_throughput"].items():
        print(
            f"rollout {name}: {med(tps[name]):.0f} tok/s, {ratio:.3f} of nondet; "
            f"{len(outputs[name])} distinct output(s) over {a.repeats} repeats",
            flush=True,
        )
    result: dict[str, Any] = {"device": fingerprint("bench")["gpu"], "profile": a.profile, "repeats": a.repeats}
    result["rollout"] = rollout
    Path(a.json).write_text(json.dumps(result, indent=1))  # what ran so far survives a time limit
    if a.knobs:
        result["gemm"] = gemm_cost(arts.model.path)
    if not a.no_train:
        result["train"] = train_cost(cfg, arts, prompts, gens, G, a.train_samples, a.repeats)
    print(
        f"rollout throughput det/non-det: {rollout['det_over_nondet_throughput']:.3f} "
        f"({med(tps['det']):.0f} vs {med(tps['nondet']):.0f} tok/s)"
    )
    if "train" in result:
        step = result["train"]["step_s"]
        print(
            f"train speed det/non-det (non-det time / det time): {result['train']['nondet_over_det_time']:.3f} "
            f"({med(step['det']):.2f}s vs {med(step['nondet']):.2f}s)"
        )
    Path(a.json).write_text(json.dumps(result, indent=1))


def train_cost(cfg: Any, arts: Any, prompts: list[Any], gens: Any, G: int, n: int, repeats: int) -> dict[str, Any]:
    """One GRPO step on the deterministic engine's samples, PyTorch's deterministic algorithms on and off."""
    import torch

    from detrl.determinism import apply_process_settings
    from detrl.grpo import group_advantages
    from detrl.trainer import GRPOTrainer, Sample

    n = min(n, len(gens))
    rewards = [float(i % 2) for i in range(n)]
    adv = group_advantages(rewards, G).tolist()
    samples = [Sample(list(prompts[i]), gens[i].token_ids, adv[i]) for i in range(n)]
    tokens = [sum(len(s.response_ids) for s in samples)]
    step: dict[str, list[float]] = {"det": [], "nondet": []}
    trainer = GRPOTrainer(cfg, arts.model.path, str(Path(arts.megatron.path) / "weights"))
    for mode in ("det", "nondet"):  # warm-up, not timed: each mode selects its own kernels
        apply_process_settings(mode == "det", cfg.seed)
        trainer.train_step(samples, tokens)
    for r in range(repeats):
        for mode in ("det", "nondet") if r % 2 == 0 else ("nondet", "det"):
            apply_process_settings(mode == "det", cfg.seed)
            torch.cuda.synchronize()
            t = time.perf_counter()
            trainer.train_step(samples, tokens)
            torch.cuda.synchronize()
            step[mode].append(time.perf_counter() - t)
            print(f"train {mode} repeat {r}: {step[mode][-1]:.2f}s", flush=True)
    trainer.close()
    med = statistics.median
    return {
        "samples": n,
        "tokens": tokens[0],
        "step_s": step,
        "nondet_over_det_time": med(step["nondet"]) / med(step["det"]),
    }


if __name__ == "__main__":
    main()
