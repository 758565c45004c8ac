"""Do the GEMMs a deterministic rollout may run give the same bits? SGLang 0.5.17's batch-invariant
matmul runs DeepGEMM on Hopper when `sgl-deep-gemm` is installed and its Triton kernel otherwise; the
trainer and a non-deterministic engine run cuBLAS. Compares the three on SmolLM2-135M's projection shapes
at several token counts. If they agree, a host with DeepGEMM and one without compute the same rollout, and
the fingerprint's `sgl-deep-gemm` entry can be set aside as a cause. Needs SGLang and a GPU.

    python benchmarks/gemm_bits.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deepgemm_probe import HEAD, SHAPES


def main() -> int:
    t0 = time.perf_counter()
    from sglang.srt.batch_invariant_ops import batch_invariant_ops as bio

    print(f"ENABLE_JIT_DEEPGEMM {bio.ENABLE_JIT_DEEPGEMM} (import {time.perf_counter() - t0:.1f}s)", flush=True)
    if not bio.ENABLE_JIT_DEEPGEMM:
        print("DeepGEMM is not usable here (needs Hopper or newer and sgl-deep-gemm): nothing to compare")
        return 2
    torch.manual_seed(0)
    shapes, tokens = [*SHAPES, HEAD], (1, 37, 256, 1000, 4099)
    differ = 0
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)  # [N, K], as nn.Linear holds it
        for m in tokens:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dg = bio._matmul_persistent_deepgemm(a=a, b=w.t())
            tr = bio._matmul_persistent_triton(a=a, b=w.t())
            cb = F.linear(a, w)  # batch-invariant mode is off in this process: cuBLAS
            same_tr, same_cb = torch.equal(dg, tr), torch.equal(dg, cb)
            differ += not (same_tr and same_cb)
            print(
                f"K={k} N={n} M={m}: deepgemm==triton {same_tr} "
                f"max|dg-tr| {(dg.float() - tr.float()).abs().max().item():.3g} deepgemm==cublas {same_cb}",
                flush=True,
            )
    print(f"{differ} of {len(shapes) * len(tokens)} products differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
