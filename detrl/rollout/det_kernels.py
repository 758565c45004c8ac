"""Two Triton kernels for SGLang's deterministic mode (see `sglang_plugin` for why and how they load):

- `add_rms_norm`: rmsnorm(x + residual) with SGLang's native arithmetic (float32 sum, the residual
  rounded to x's dtype, float32 variance of the unrounded sum), one program per row. A row's result
  depends on its own values and the hidden size alone, never on the batch. Not SGLang's bits: its
  native path reduces in another order.
- `gumbel_argmax`: the argmax of log-probs plus Gumbel noise from SGLang's murmur hash, with the
  float64 operations of SGLang's `multinomial_with_seed` in their order, in one pass: the same token.

Triton exists only beside a CUDA torch; `TRITON_INTERPRET=1` runs these on the CPU (the tests), with
the interpreter's log and rsqrt in place of libdevice's, which it lacks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _log(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.log(x)
    return libdevice.log(x)  # torch's log on a GPU (tl.log of a float32 is an approximation)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, n_cols, eps, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    s = x.to(tl.float32) + tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_ptr + row * n_cols + cols, s.to(x.dtype, fp_downcast_rounding="rtne"), mask=mask)
    var = tl.math.div_rn(tl.sum(s * s, axis=0), n_cols.to(tl.float32))
    if INTERPRET:
        inv = tl.rsqrt(var + eps)
    else:
        inv = libdevice.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, ((s * inv) * w).to(x.dtype, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _gumbel_argmax_kernel(
    h_ptr, lp_ptr, c_ptr, out_ptr, n_cols, h_stride, lp_stride, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    # Per element, as SGLang: u = hash * (1 / (2^32 - 1)) (torch divides by a scalar through its
    # reciprocal), log, clamp at the lowest float64, negate, log, negate, add the log-prob in float64.
    # Then torch.argmax's choice: the first NaN if any, else the first maximum.
    row = tl.program_id(0).to(tl.int64)
    inv_max = tl.load(c_ptr)
    lowest = tl.load(c_ptr + 1)
    best_val = tl.load(c_ptr + 2)  # -inf
    best_idx = tl.zeros([], dtype=tl.int32)
    first_nan = tl.zeros([], dtype=tl.int32) + n_cols
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0)
        lp = tl.load(lp_ptr + row * lp_stride + cols, mask=mask, other=0.0)
        g = _log(h.to(tl.float64) * inv_max, INTERPRET)
        g = tl.where(g < lowest, lowest, g)
        g = -_log(-g, INTERPRET)
        v = g + lp.to(tl.float64)
        is_nan = (v != v) & mask
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, cols, n_cols), axis=0))
        v = tl.where(mask & (v == v), v, float("-inf"))
        blk_max = tl.max(v, axis=0)
        blk_idx = tl.min(tl.where(mask & (v == blk_max), cols, n_cols), axis=0)
        take = blk_max > best_val
        best_idx = tl.where(take, blk_idx, best_idx)
        best_val = tl.where(take, blk_max, best_val)
    tl.store(out_ptr + row, tl.where(first_nan < n_cols, first_nan, best_idx).to(tl.int64))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for 2-D contiguous x and residual of one dtype."""
    out, res = torch.empty_like(x), torch.empty_like(residual)
    n_rows, n_cols = x.shape
    block = triton.next_power_of_2(n_cols)
    warps = min(max(block // 256, 4), 16)  # from the hidden size alone, like everything else here
    _add_rms_norm_kernel[(n_rows,)](
        x, residual, weight, out, res, n_cols, eps, BLOCK=block, INTERPRET=_INTERPRET, num_warps=warps
    )
    return out, res


_CONSTS: dict[torch.device, torch.Tensor] = {}


def gumbel_argmax(hashed: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """argmax(logprobs + Gumbel(hashed)) as SGLang's float64 torch code computes it: (n, 1) int64.
    `hashed`: uint32 (n, m) from SGLang's murmur_hash32; `logprobs`: float32 (n, m)."""
    dev = logprobs.device
    if dev not in _CONSTS:  # float64 constants through memory: a float argument would reach Triton as float32
        consts = [1.0 / torch.iinfo(torch.uint32).max, torch.finfo(torch.float64).min, float("-inf")]
        _CONSTS[dev] = torch.tensor(consts, dtype=torch.float64, device=dev)
    n, m = logprobs.shape
    out = torch.empty((n, 1), dtype=torch.int64, device=dev)
    _gumbel_argmax_kernel[(n,)](
        hashed,
        logprobs,
        _CONSTS[dev],
        out,
        m,
        hashed.stride(0),
        logprobs.stride(0),
        BLOCK=2048,
        INTERPRET=_INTERPRET,
        num_warps=8,
    )
    return out
