"""det-rl's kernels for SGLang's deterministic mode (detrl.rollout.det_kernels) against SGLang's own, on
this GPU, without an engine:
- seeded sampler: SGLang's multinomial_with_seed vs det-rl's (SGLang's hash, then `gumbel_argmax`): the
  same token in every row over random draws (log-probs with underflowed zeros) and corner hashes (0 and
  2^32 - 1, where SGLang's float64 steps give -inf, +inf and NaN), and the time of one call;
- residual RMSNorm: SGLang's forward_native under batch-invariant mode, sgl_kernel's fused_add_rmsnorm
  (the non-deterministic default) and det-rl's `add_rms_norm`: each row bitwise equal whatever the
  batch size and offset, max |diff| against native, and one forward's norms (2 a layer + the last) as a
  CUDA graph.
Prints the figures and writes JSON.

    python benchmarks/det_kernels.py --json FILE [--vocab 49152,151936] [--hidden 576,896] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

BATCHES = (1, 2, 3, 7, 16, 37, 64, 100, 128, 255, 256, 511)


def cuda_time(fn: Any, repeats: int = 50) -> float:
    """Median seconds of fn() after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def sampler(vocab: int, trials: int) -> dict[str, Any]:
    import sglang.srt.layers.sampler as sgl_sampler

    from detrl.rollout import det_kernels
    from detrl.rollout.sglang_plugin import seeded_sampler

    ours = seeded_sampler(det_kernels)
    theirs = sgl_sampler.multinomial_with_seed
    g = torch.Generator(device="cuda").manual_seed(vocab)
    rows = differ = zero_probs = 0
    for t in range(trials):
        n = BATCHES[t % len(BATCHES)]
        logits = torch.randn(n, vocab, device="cuda", generator=g) * (1 + 4 * (t % 5))
        lp = torch.log(torch.softmax(logits, -1))  # as SGLang's sampler passes them
        seed = torch.randint(0, 2**62, (n,), device="cuda", generator=g)
        pos = torch.randint(0, 4096, (n,), device="cuda", generator=g)
        differ += int((ours(lp, seed, pos) != theirs(lp, seed, pos)).sum())
        rows += n
        zero_probs += int(torch.isinf(lp).sum())
    # corner hashes through SGLang's own float64 code: its hash is replaced by one that we control
    n = 8
    lp = torch.log(torch.softmax(torch.randn(n, vocab, device="cuda", generator=g) * 30, -1))
    lp[1] = float("-inf")
    hashed = torch.randint(0, 2**32, (n, vocab), device="cuda", generator=g, dtype=torch.int64)
    hashed[2], hashed[3, ::7] = 0, 2**32 - 1
    zeros = torch.isinf(lp[4]).nonzero()
    if len(zeros):
        hashed[4, zeros[0, 0]] = 2**32 - 1  # +inf noise on a zero probability: NaN, which torch.argmax picks
    hashed[5] = hashed[5, 0]  # ties everywhere
    hashed = hashed.to(torch.uint32)
    real_hash = sgl_sampler.murmur_hash32
    sgl_sampler.murmur_hash32 = lambda *a: hashed
    try:
        corner_theirs = theirs(lp, torch.zeros(n, dtype=torch.int64, device="cuda"), torch.zeros_like(lp[:, 0]).long())
    finally:
        sgl_sampler.murmur_hash32 = real_hash
    corner_ours = det_kernels.gumbel_argmax(hashed, lp)
    corner_differ = int((corner_ours != corner_theirs).sum())

    n = 256
    logits = torch.randn(n, vocab, device="cuda", generator=g) * 4
    probs = torch.softmax(logits, -1)
    lp = torch.log(probs)
    seed = torch.randint(0, 2**62, (n,), device="cuda", generator=g)
    pos = torch.randint(0, 4096, (n,), device="cuda", generator=g)
    t_theirs = cuda_time(lambda: theirs(lp, seed, pos))
    t_ours = cuda_time(lambda: ours(lp, seed, pos))
    t_multinomial = cuda_time(lambda: torch.multinomial(probs, 1))
    print(
        f"sampler vocab {vocab}: {rows} rows in {trials} draws, {differ} tokens differ "
        f"({zero_probs} zero probabilities); corner rows differ: {corner_differ} of {n}; "
        f"at 256 rows: SGLang {t_theirs * 1e3:.3f} ms, det-rl {t_ours * 1e3:.3f} ms "
        f"({t_theirs / t_ours:.1f}x), torch.multinomial (non-det) {t_multinomial * 1e3:.3f} ms",
        flush=True,
    )
    return {
        "rows": rows,
        "tokens_differ": differ,
        "zero_probabilities": zero_probs,
        "corner_rows_differ": corner_differ,
        "ms_at_256": {"sglang": t_theirs * 1e3, "detrl": t_ours * 1e3, "torch_multinomial": t_multinomial * 1e3},
    }


def rms_norm(hidden: int, layers: int) -> dict[str, Any]:
    from sgl_kernel import fused_add_rmsnorm
    from sglang.srt.batch_invariant_ops import disable_batch_invariant_mode, enable_batch_invariant_mode

    from detrl.rollout import det_kernels
    from detrl.rollout.sglang_plugin import sglang_native_add_rms_norm

    eps, bf = 1e-5, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(hidden)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(bf)

    def native(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sglang_native_add_rms_norm(x, r, w, eps)

    def fused(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, r = x.clone(), r.clone()
        fused_add_rmsnorm(x, r, w, eps)
        return x, r

    def detrl(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return det_kernels.add_rms_norm(x, r, w, eps)

    impls = {"sglang_native": native, "sgl_kernel_fused": fused, "detrl": detrl}
    big = max(BATCHES) + 64
    X = (torch.randn(big, hidden, device="cuda", generator=g) * 3).to(bf)
    R = (torch.randn(big, hidden, device="cuda", generator=g) * 3).to(bf)
    enable_batch_invariant_mode()
    try:
        out: dict[str, Any] = {}
        ref = native(X, R)
        for name, f in impls.items():
            full = f(X, R)
            bad = [
                f"{n}@{k}"
                for n in BATCHES
                for k in (0, 5)
                if not all(torch.equal(a, b[k : k + n]) for a, b in zip(f(X[k : k + n], R[k : k + n]), full))
            ]
            diff = (full[0].float() - ref[0].float()).abs()
            out[name] = {
                "batch_sizes_not_bitwise": bad,
                "max_abs_diff_vs_native": float(diff.max()),
                "elements_differing_from_native": int((diff > 0).sum()) / diff.numel(),
                "residual_equal_to_native": torch.equal(full[1], ref[1]),
            }
        for name, f in impls.items():
            x, r = X[:256].contiguous(), R[:256].contiguous()
            f(x, r)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(2 * layers + 1):
                    x, r = f(x, r)
            out[name]["forward_ms_at_256"] = cuda_time(graph.replay) * 1e3
    finally:
        disable_batch_invariant_mode()
    print(f"residual RMSNorm hidden {hidden}, {2 * layers + 1} norms a forward at 256 rows:", flush=True)
    for name, r in out.items():
        print(
            f"  {name}: {r['forward_ms_at_256']:.3f} ms a forward; not bitwise across batches: "
            f"{r['batch_sizes_not_bitwise'] or 'none'}; max |diff| vs native {r['max_abs_diff_vs_native']:.4g} "
            f"({100 * r['elements_differing_from_native']:.2f} % of elements), residual equal: "
            f"{r['residual_equal_to_native']}",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--vocab", default="49152,151936")
    ap.add_argument("--hidden", default="576,896")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--trials", type=int, default=48)
    a = ap.parse_args()
    from detrl.determinism import fingerprint

    result: dict[str, Any] = {"device": fingerprint("bench")["gpu"], "layers": a.layers}
    result["sampler"] = {v: sampler(int(v), a.trials) for v in a.vocab.split(",")}
    Path(a.json).write_text(json.dumps(result, indent=1))
    result["rms_norm"] = {h: rms_norm(int(h), a.layers) for h in a.hidden.split(",")}
    Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
