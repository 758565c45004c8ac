"""Rollout engines. Every engine implements `RolloutEngine`: token ids in, token ids and per-token
log-probs out, per-sample sampling seeds, weight updates by HF names, and a proof of the weights
it holds. `make_engine` picks one by `backends.rollout`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..config import RunConfig

if TYPE_CHECKING:  # the rollout actor imports this package before torch, to start SGLang's processes first
    import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the temperature-scaled distribution
    finish_reason: str = "length"  # "stop" | "length"
    meta: dict[str, Any] = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, params: SamplingParams
    ) -> list[Generation]:
        """`seeds[i]` fixes sample i's draws: the draw at a position depends only on (seed, position).
        None: unseeded sampling (production mode, not reproducible)."""

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """Load HF-named tensors (a full or partial set) into the engine."""

    def verify_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Prove the engine holds exactly these HF-named tensors, bit for bit, and nothing else
        unaccounted for. Returns what differs (empty list: proven)."""

    def info(self) -> dict[str, Any]:
        """Backend, dtype and settings, recorded in the fingerprint."""

    def shutdown(self) -> None: ...


def step_kv_tokens(cfg: RunConfig) -> int:
    """KV-cache tokens one step's batch can need at once (every sample at its longest), plus 10 %: the
    engine's cache when runs share a GPU."""
    r = cfg.rollout
    return int(r.prompts_per_step * r.samples_per_prompt * (cfg.data.max_prompt_tokens + r.max_new_tokens) * 1.1)


def prepare_engine(cfg: RunConfig) -> Any:
    """What `make_engine` can set up before the engine's own start, for a caller with other work first:
    SGLang's processes, started ahead (`detrl.rollout.sglang_ahead.prepare`); None for the hf engine. What it
    returns has `import_engine()` (this process's import of the engine, in a thread, once the caller has
    imported what its own work meanwhile imports), `imported()` (wait for that import) and `abandon()`, for
    when no engine is made from it."""
    if cfg.backends.rollout != "sglang":
        return None
    from .sglang_ahead import prepare

    return prepare(cfg.rollout.sglang, cfg.determinism.enabled)


def make_engine(
    cfg: RunConfig, model_dir: str, schedule_args: Mapping[str, int] | None = None, prepared: Any = None
) -> RolloutEngine:
    """`schedule_args`: SGLang batch limits of a perturbed schedule (detrl.schedule); the hf engine has none.
    `prepared`: what `prepare_engine` returned for this config."""
    # each backend imports on use: sglang is optional (GPU hosts only)
    if cfg.backends.rollout == "hf":
        from .hf import HFEngine

        return HFEngine(
            model_dir,
            cfg.rollout.hf,
            deterministic=cfg.determinism.enabled,
            prefill_logprobs=cfg.train.on_policy == "exact",
        )
    if cfg.backends.rollout == "sglang":
        from .sglang import SGLangEngine

        return SGLangEngine(
            model_dir,
            cfg.rollout.sglang,
            deterministic=cfg.determinism.enabled,
            seed=cfg.seed if cfg.pins_seeds else None,
            kv_tokens=step_kv_tokens(cfg) if cfg.resources.gpu_share < 1 else None,
            prefill_logprobs=cfg.train.on_policy == "exact",
            schedule_args=schedule_args,
            start=prepared,
        )
    raise ValueError(f"unknown rollout backend {cfg.backends.rollout!r}")
