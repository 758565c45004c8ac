"""Megatron-core modules whose forward runs the rollout engine's kernels, for exact on-policy training
(`train.on_policy=exact`, `detrl.onpolicy` says why and what is matched).

Each op's forward is the kernel SGLang's deterministic prefill runs, called in the trainer's process;
its backward is the gradient of a plain PyTorch formula of the same op (`_EngineOp`), since any
deterministic backward will do. Megatron stays the trainer: these are its module slots (layer norms,
linear layers, MLP, core attention) filled with other forwards; the optimizer, checkpoints and weight
names are unchanged.

Forward on a GPU, then the reference (the backward, and the forward on the CPU):
- GEMMs and the output log-softmax: SGLang's batch-invariant `aten::mm`/`addmm`/`_log_softmax`
  (`engine_forward`); the same aten ops.
- RMSNorm: det-rl's Triton kernel, the one SGLang runs through det-rl's plugin; a float32 formula.
- rotary: SGLang's `apply_rope_with_cos_sin_cache_inplace` with SGLang's float32 cos/sin table; float32.
- SiLU-and-mul: SGLang's `silu_and_mul`; a float32 formula.
- attention: flashinfer's paged prefill, planned as SGLang's deterministic mode plans it;
  `scaled_dot_product_attention` per sequence on the CPU, and for the backward one causal call over the
  right-padded batch as Megatron lays it out (`rope_attention_padded_ref`).

A linear layer is `F.linear(x, W, b)` over [tokens, features], as SGLang calls it: the bias is added
inside the GEMM (Megatron adds it after, another rounding). Rotary is applied by the attention module
(the model is built without Megatron's rotary embedding), on the packed real tokens of each row.

On the CPU the reference kernels stand in (tests of the plumbing); the modules need tensor parallel 1.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import sdpa_kernel

from ..config import sglang_prefill_tile
from .attention import BACKENDS

_LENGTHS: ContextVar[list[int] | None] = ContextVar("detrl_exact_lengths", default=None)
# the packing of one forward's rows, computed once for all its layers (no per-layer host sync)
_PACKING: ContextVar[dict[Any, Any] | None] = ContextVar("detrl_exact_packing", default=None)
# SGLang's deterministic flashinfer prefill splits the KV of a request into tiles of this many tokens,
# and gives flashinfer this workspace
_SPLIT_TILE = sglang_prefill_tile("flashinfer")
_WORKSPACE_BYTES = 2048 * 1024 * 1024


@contextlib.contextmanager
def engine_forward(lengths: Sequence[int]) -> Iterator[None]:
    """Around one forward of a model built with engine kernels: each row's real length (right
    padding), and on a GPU SGLang's batch-invariant GEMMs and log-softmax for the ops inside."""
    token = _LENGTHS.set([int(n) for n in lengths])
    packing = _PACKING.set({})
    try:
        if torch.cuda.is_available():
            from sglang.srt.batch_invariant_ops import disable_batch_invariant_mode, enable_batch_invariant_mode

            enable_batch_invariant_mode()
            try:
                yield
            finally:
                disable_batch_invariant_mode()
        else:
            yield
    finally:
        _PACKING.reset(packing)
        _LENGTHS.reset(token)


def _packing(lengths: list[int], width: int, device: torch.device) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """For a right-padded batch of `width` columns: each real token's position (packed: row 0's tokens,
    then row 1's...), the rows' cumulative bounds, and the [width, rows] mask of real tokens. Built on the
    host from the lengths, so no layer waits on the GPU for them, and shared by every layer of a forward."""
    cache = _PACKING.get()
    key = (width, device)
    if cache is not None and key in cache:
        return cache[key]
    positions = torch.cat([torch.arange(n) for n in lengths])
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    real = torch.arange(width)[:, None] < torch.tensor(lengths)[None, :]
    out = (positions.to(device, non_blocking=True), bounds, real.to(device, non_blocking=True))
    if cache is not None:
        cache[key] = out
    return out


def pack(t: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """[width, rows, ...] right-padded (Megatron's layout) -> [tokens, ...], row after row: slices, no
    index kernels (which deterministic mode would sort)."""
    return torch.cat([t[:n, r] for r, n in enumerate(lengths)])


def unpack(x: torch.Tensor, lengths: Sequence[int], width: int) -> torch.Tensor:
    """`pack`'s inverse, zeros at the padding."""
    out = x.new_zeros(width, len(lengths), *x.shape[1:])
    a = 0
    for r, n in enumerate(lengths):
        out[:n, r] = x[a : a + n]
        a += n
    return out


# -- reference formulas (backward everywhere, forward on the CPU)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    inv = torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + eps)
    return ((x32 * inv) * weight.float()).to(x.dtype)


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary of x [tokens, heads, d] by the float32 cos|sin table rows of `positions`."""
    cos, sin = cache[positions].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Causal attention of packed sequences (q [T, Hq, d], k/v [T, Hkv, d], `bounds` the cumulative lengths)."""
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        with sdpa_kernel(BACKENDS):  # never cuDNN, whose backward is not deterministic
            out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out, dim=0)


def rope_attention_padded_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """Rotary then causal attention over right-padded rows (q [width, rows, Hq, d], k/v [width, rows, Hkv,
    d], `real` the [width, rows] mask) in one SDPA call, zero at the padding: a real token attends only to
    earlier tokens of its own row, never to padding, so each row is its sequence alone. The backward of
    the engine's attention on a GPU, one kernel per layer."""
    s, b = q.shape[:2]
    positions = torch.arange(s, device=q.device).repeat_interleave(b)

    def rope(t: torch.Tensor) -> torch.Tensor:  # [s, b, H, d] -> [b, H, s, d]
        return rope_ref(t.reshape(s * b, *t.shape[2:]), positions, table).view(t.shape).permute(1, 2, 0, 3)

    groups = q.shape[2] // k.shape[2]
    qp, kp, vp = rope(q), rope(k), v.permute(1, 2, 0, 3)
    if groups > 1:
        kp, vp = kp.repeat_interleave(groups, dim=1), vp.repeat_interleave(groups, dim=1)
    with sdpa_kernel(BACKENDS):  # never cuDNN, whose backward is not deterministic
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=q.shape[-1] ** -0.5)
    return torch.where(real[:, :, None, None], out.permute(2, 0, 1, 3), 0.0)


def rope_table(dim: int, base: float, positions: int, device: torch.device) -> torch.Tensor:
    """SGLang's float32 cos|sin table (`RotaryEmbedding._compute_cos_sin_cache`), computed on `device` as
    SGLang computes it on the GPU it loads the model on."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    t = torch.arange(positions, dtype=torch.float, device=device)
    freqs = torch.einsum("i,j -> ij", t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


# -- the engine's kernels


class _EngineOp(torch.autograd.Function):
    """Forward by `kernel`, backward by the gradient of `reference` (same inputs, same outputs)."""

    @staticmethod
    def forward(ctx: Any, kernel: Callable[..., Any], reference: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return kernel(*inputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.reference(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        wanted = [x for x in inputs if x.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
        return (None, None, *[next(got) if x.requires_grad else None for x in inputs])


def engine_op(kernel: Callable[..., Any], reference: Callable[..., Any], *inputs: torch.Tensor) -> Any:
    return _EngineOp.apply(kernel, reference, *inputs)


def on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    ref = functools.partial(rms_norm_ref, eps=eps)
    if not on_gpu(x):
        return engine_op(ref, ref, x, weight)
    from ..rollout import det_kernels

    return engine_op(lambda a, w: det_kernels.rms_norm(a.contiguous(), w, eps), ref, x, weight)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    if not on_gpu(x):
        return engine_op(silu_mul_ref, silu_mul_ref, x)
    from sglang.srt.layers.activation import silu_and_mul

    return engine_op(lambda a: silu_and_mul(a.contiguous()), silu_mul_ref, x)


def rope_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], table: torch.Tensor
) -> torch.Tensor:
    """Rotary then causal attention of right-padded rows (q [width, rows, Hq, d], k/v [width, rows, Hkv, d],
    `lengths` each row's real tokens): [width, rows, Hq, d] out, zero at the padding. The forward packs the
    real tokens for the engine's kernels (on the CPU: the per-sequence formula, the hf engine's shape);
    the backward is `rope_attention_padded_ref`'s, on the padded rows as they are."""
    lengths = [int(n) for n in lengths]
    width = q.shape[0]
    positions, bounds, real = _packing(lengths, width, q.device)

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return rope_attention_padded_ref(q, k, v, real, table)

    if not on_gpu(q):

        def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            qs, ks, vs = (pack(t, lengths) for t in (q, k, v))
            out = attention_ref(rope_ref(qs, positions, table), rope_ref(ks, positions, table), vs, bounds)
            return unpack(out, lengths, width)

        return engine_op(per_sequence, reference, q, k, v)

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from sglang.kernels.ops.attention.rope import apply_rope_with_cos_sin_cache_inplace

        qs, ks, vs = (pack(t, lengths) for t in (q, k, v))  # new tensors: rotary may work in place
        apply_rope_with_cos_sin_cache_inplace(positions=positions, q=qs, k=ks, cos_sin_cache=table, is_neox=True)
        return unpack(_flashinfer(q.device)(qs, ks, vs, bounds), lengths, width)

    return engine_op(kernel, reference, q, k, v)


class _FlashInferPrefill:
    """flashinfer's paged prefill (page size 1) as SGLang's deterministic mode runs an extend without
    prefix: the fa2 backend, a fixed split tile, causal, scale head_dim**-0.5, no soft cap."""

    def __init__(self, device: torch.device):
        import flashinfer

        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.planned: tuple[Any, ...] | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        # a plan is a function of these alone, and SGLang too plans once per batch for all layers
        key = (tuple(bounds), q.shape[1], k.shape[1], q.shape[2], q.dtype, k.dtype)
        if key != self.planned:
            indptr = torch.tensor(bounds, dtype=torch.int32)  # on the host, where flashinfer plans
            self.wrapper.begin_forward(
                indptr,
                indptr,
                torch.arange(q.shape[0], dtype=torch.int32, device=q.device),
                torch.ones(len(bounds) - 1, dtype=torch.int32),
                q.shape[1],
                k.shape[1],
                q.shape[2],
                1,
                q_data_type=q.dtype,
                kv_data_type=k.dtype,
                fixed_split_size=_SPLIT_TILE,
            )
            self.planned = key
        return self.wrapper.forward(q, (k, v), causal=True, sm_scale=q.shape[-1] ** -0.5, logits_soft_cap=0.0)


@functools.cache
def _flashinfer(device: torch.device) -> _FlashInferPrefill:
    return _FlashInferPrefill(device)


# -- Megatron module slots


class ExactRMSNorm(torch.nn.Module):
    """The layer-norm slot (`WrappedTorchNorm`'s constructor): RMSNorm by `rms_norm`."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__()
        self.config, self.eps = config, eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


class ExactColumnLinear(ColumnParallelLinear):
    """`F.linear` over [tokens, features] with the bias inside the GEMM, as SGLang's linear layers."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, **_: Any) -> Any:
        w = self.weight if weight is None else weight
        bias = None if self.skip_bias_add else self.bias
        out = F.linear(input_.reshape(-1, input_.shape[-1]), w, bias)
        return out.view(*input_.shape[:-1], out.shape[-1]), (self.bias if self.skip_bias_add else None)


class ExactRowLinear(RowParallelLinear):
    def forward(self, input_: torch.Tensor, **_: Any) -> Any:
        bias = None if self.skip_bias_add else self.bias
        out = F.linear(input_.reshape(-1, input_.shape[-1]), self.weight, bias)
        return out.view(*input_.shape[:-1], out.shape[-1]), (self.bias if self.skip_bias_add else None)


class ExactMLP(MLP):
    def forward(self, hidden_states: torch.Tensor, per_token_scale: Any = None, **_: Any) -> Any:
        up, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            up = up + bias
        return self.linear_fc2(silu_mul(up))


class ExactAttention(MegatronModule):
    """The core-attention slot: rotary (the model is built without Megatron's) and causal attention over
    each row's real tokens, packed; padding rows out as zeros. The rows' lengths come from `engine_forward`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self" or config.attention_dropout:
            raise ValueError("ExactAttention supports causal self-attention without dropout")
        self.rope_base = 10000.0
        self.rope_positions = 4096

    def set_rope(self, base: float, positions: int) -> None:
        self.rope_base, self.rope_positions = base, positions

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        lengths = _LENGTHS.get()
        s, b = query.shape[:2]
        if lengths is None or len(lengths) != b or max(lengths) > s:
            raise RuntimeError("a model with engine kernels runs inside engine_forward(lengths), one length a row")
        table = _table(query.shape[-1], self.rope_base, max(self.rope_positions, s), query.device)
        return rope_attention(query, key, value, lengths, table).reshape(s, b, -1)


@functools.cache
def _table(dim: int, base: float, positions: int, device: torch.device) -> torch.Tensor:
    return rope_table(dim, base, positions, device)


def install(spec: Any) -> None:
    """Fill a local GPT layer spec's slots with the modules above."""
    subs = spec.submodules
    subs.input_layernorm = ExactRMSNorm
    subs.pre_mlp_layernorm = ExactRMSNorm
    attn = subs.self_attention.submodules
    attn.core_attention = ExactAttention
    attn.linear_qkv = ExactColumnLinear
    attn.linear_proj = ExactRowLinear
    subs.mlp.submodules.linear_fc1 = ExactColumnLinear
    subs.mlp.submodules.linear_fc2 = ExactRowLinear


def finish(model: Any, config: TransformerConfig, hidden_size: int, rope_base: float, positions: int) -> None:
    """After GPTModel is built from an `install`ed spec: the final norm and each attention's rotary."""
    model.decoder.final_layernorm = ExactRMSNorm(config, hidden_size, config.layernorm_epsilon)
    for layer in model.decoder.layers:
        layer.self_attention.core_attention.set_rope(rope_base, positions)
        # built as Megatron's MLP (which Megatron gives its process groups), its forward is ExactMLP's
        layer.mlp.__class__ = ExactMLP
