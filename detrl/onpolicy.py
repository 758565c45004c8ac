"""Exact on-policy training (`train.on_policy=exact`): the rules, the per-iteration mismatch between the
trainer's and the rollout's log-probs, and the layer-by-layer diagnostic that names where the two
forwards part.

In exact mode the rollout engine samples the tokens as always, then scores prompt + response in one
prefill pass; those are the log-probs recorded and the ones the loss uses as the old policy. The
trainer's forward over the same tokens must give the same bits:
- hf engine (CPU): each sequence alone through both models (the CPU's GEMMs are row-exact only at one
  shape), the same attention kernel on both sides, `log_softmax` of float32 logits.
- SGLang (GPU): SGLang's deterministic prefill, and in the trainer the same kernels called from
  Megatron's modules (`detrl.megatron.exact`): SGLang's batch-invariant GEMMs and log-softmax, det-rl's
  RMSNorm, SGLang's rotary and SiLU-and-mul kernels, flashinfer's prefill with SGLang's plan.
Decode log-probs cannot be the reference: decode attention reduces over the KV cache in another order
than any prefill over the whole sequence, and SGLang's sampler takes log(softmax), not log_softmax.

This module imports no torch at load (the config validates with it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def exact_mode_problem(cfg: Any) -> str | None:
    """Why `cfg` (a RunConfig with train.on_policy=exact) cannot run exactly on policy, with the fix;
    None when it can."""
    if cfg.resources.tensor_parallel != 1:
        return (
            "train.on_policy=exact needs resources.tensor_parallel=1 (the vocab-parallel log-softmax is not "
            "the engine's); use data parallelism (trainer_ranks)"
        )
    if cfg.backends.rollout == "hf":
        pair = {"sdpa": "sdpa", "local": "eager"}[cfg.train.attention]
        if cfg.rollout.hf.attn_implementation != pair:
            return (
                f"train.on_policy=exact with the hf engine needs the trainer's attention kernel on both sides: "
                f"train.attention={cfg.train.attention} pairs with rollout.hf.attn_implementation={pair} "
                f"(got {cfg.rollout.hf.attn_implementation})"
            )
        if cfg.rollout.hf.batching != "per_sequence":
            return "train.on_policy=exact with the hf engine needs rollout.hf.batching=per_sequence"
        if cfg.train_dtype() != "float32":
            return "train.on_policy=exact with the hf engine (float32) needs train.dtype=float32"
        return None
    sg = cfg.rollout.sglang
    if not cfg.determinism.enabled:
        return (
            "train.on_policy=exact needs determinism.enabled=true: the trainer matches SGLang's "
            "batch-invariant kernels, which only deterministic inference runs"
        )
    if cfg.rollout.temperature != 1.0:
        return (
            f"train.on_policy=exact with SGLang needs rollout.temperature=1.0 (got {cfg.rollout.temperature}): "
            "SGLang's prefill log-probs are not temperature-scaled"
        )
    if sg.attention_backend != "flashinfer":
        return (
            "train.on_policy=exact with SGLang needs rollout.sglang.attention_backend=flashinfer "
            "(the trainer runs its kernel)"
        )
    if sg.kernels != "detrl":
        return (
            "train.on_policy=exact with SGLang needs rollout.sglang.kernels=detrl (the trainer runs det-rl's RMSNorm)"
        )
    if cfg.train_dtype() != sg.dtype:
        return f"train.on_policy=exact needs train.dtype equal to rollout.sglang.dtype ({sg.dtype})"
    return None


# -- the mismatch of one iteration


@dataclass
class Mismatch:
    max_abs_diff: float
    mean_abs_diff: float
    tokens: int  # response tokens whose two log-probs differ in any bit
    total: int
    first: tuple[int, int] | None  # (sample, token position in its response) of the first such token

    def stats(self) -> dict[str, float]:
        return {
            "logprob_max_abs_diff": self.max_abs_diff,
            "logprob_mean_abs_diff": self.mean_abs_diff,
            "logprob_mismatched_tokens": float(self.tokens),
        }

    def describe(self, rollout: Sequence[np.ndarray], trainer: Sequence[np.ndarray]) -> str:
        if self.first is None:
            return "trainer and rollout log-probs are bitwise equal"
        s, t = self.first
        return (
            f"{self.tokens} of {self.total} response tokens differ (max |diff| {self.max_abs_diff:.3g}); "
            f"first: sample {s}, token {t}: rollout {float(rollout[s][t])!r}, trainer {float(trainer[s][t])!r}"
        )


def mismatch(rollout: Sequence[np.ndarray], trainer: Sequence[np.ndarray]) -> Mismatch:
    """Compare per-sample log-prob rows bit for bit (as float32)."""
    if len(rollout) != len(trainer):
        raise ValueError(f"{len(rollout)} rollout rows but {len(trainer)} trainer rows")
    worst, total_abs, count, total = 0.0, 0.0, 0, 0
    first = None
    for i, (a, b) in enumerate(zip(rollout, trainer)):
        a32, b32 = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        if a32.shape != b32.shape:
            raise ValueError(f"sample {i}: {a32.size} rollout log-probs but {b32.size} trainer log-probs")
        if not a32.size:
            continue
        diff = np.abs(a32.astype(np.float64) - b32.astype(np.float64))
        differ = a32.view(np.uint32) != b32.view(np.uint32)
        worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any() else float("inf"))
        total_abs += float(np.nansum(diff))
        count += int(differ.sum())
        total += a32.size
        if first is None and differ.any():
            first = (i, int(np.argmax(differ)))
    return Mismatch(worst, total_abs / total if total else 0.0, count, total, first)


# -- the layer-by-layer diagnostic


@dataclass
class LayerDiff:
    op: str | None  # the first op whose outputs differ; None: every op equal
    compared: list[str]
    max_abs_diff: float = 0.0
    rows: int = 0  # token rows of that op that differ

    def describe(self) -> str:
        if self.op is None:
            return f"every op equal ({len(self.compared)} compared)"
        return f"first difference at {self.op}: {self.rows} token rows differ, max |diff| {self.max_abs_diff:.3g}"


def op_names(num_layers: int) -> list[str]:
    """The ops both sides record, in forward order, under one naming."""
    names = ["embedding"]
    for i in range(num_layers):
        names += [f"layers.{i}.{op}" for op in ("input_norm", "attention", "post_attention_norm", "mlp")]
    return [*names, "final_norm", "logprobs"]


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any], order: Iterable[str]) -> LayerDiff:
    """The first op in `order` whose tensors (token rows x features, any leading shape) are not bitwise
    equal. Ops missing from either side are skipped and not listed as compared."""

    compared = []
    for op in order:
        if op not in a or op not in b:
            continue
        x, y = a[op].detach().cpu(), b[op].detach().cpu()
        compared.append(op)
        if x.shape != y.shape or x.dtype != y.dtype:
            return LayerDiff(op, compared, float("inf"), -1)
        if not _same_bits(x, y):
            rows_x, rows_y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
            rows = int((~_row_bits_equal(rows_x, rows_y)).sum())
            return LayerDiff(op, compared, float((x.double() - y.double()).abs().max()), rows)
    return LayerDiff(None, compared)


def _same_bits(x: Any, y: Any) -> bool:
    import torch

    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return bool(torch.equal(x.contiguous().view(ints), y.contiguous().view(ints)))


def _row_bits_equal(x: Any, y: Any) -> Any:
    import torch

    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return (x.contiguous().view(ints) == y.contiguous().view(ints)).all(dim=1)


def _remove(hooks: list[Any]) -> None:
    for h in hooks:
        h.remove()


def _recorder(record: dict[str, Any], name: str) -> Callable[..., None]:
    """A forward hook that keeps a module's output (the first of a tuple) as [tokens, features]."""

    def hook(_m: Any, _args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) else out
        record[name] = t.detach().reshape(-1, t.shape[-1]).clone()

    return hook


def capture_hf(model: Any, record: dict[str, Any]) -> Callable[[], None]:
    """Record a transformers Llama/Qwen2 model's per-op outputs ([tokens, features], batch 1) into
    `record` under `op_names`; returns the function that removes the hooks."""
    hooks = []
    put = functools.partial(_recorder, record)
    inner = model.model
    hooks.append(inner.embed_tokens.register_forward_hook(put("embedding")))
    for i, layer in enumerate(inner.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(put(f"layers.{i}.input_norm")))
        hooks.append(layer.self_attn.register_forward_hook(put(f"layers.{i}.attention")))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(put(f"layers.{i}.post_attention_norm")))
        hooks.append(layer.mlp.register_forward_hook(put(f"layers.{i}.mlp")))
    hooks.append(inner.norm.register_forward_hook(put("final_norm")))
    return functools.partial(_remove, hooks)


def capture_megatron(model: Any, record: dict[str, Any]) -> Callable[[], None]:
    """The same ops of a Megatron GPTModel called on one sequence ([s, 1, h])."""
    hooks = []
    put = functools.partial(_recorder, record)
    hooks.append(model.embedding.register_forward_hook(put("embedding")))
    for i, layer in enumerate(model.decoder.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(put(f"layers.{i}.input_norm")))
        hooks.append(layer.self_attention.register_forward_hook(put(f"layers.{i}.attention")))
        hooks.append(layer.pre_mlp_layernorm.register_forward_hook(put(f"layers.{i}.post_attention_norm")))
        hooks.append(layer.mlp.register_forward_hook(put(f"layers.{i}.mlp")))
    hooks.append(model.decoder.final_layernorm.register_forward_hook(put("final_norm")))
    return functools.partial(_remove, hooks)
