"""The GRPO pieces that are pure math: a sample as the trainer takes it and a step's result as it returns
it (plain data: the driver receives them without importing the trainer's Megatron), group-normalized
advantages and the PPO-clip token loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    # the rollout's log-probs of the response tokens: the loss's old policy in exact on-policy mode
    rollout_logprobs: list[float] | None = None


@dataclass
class StepResult:
    losses: list[float]  # one per optimizer update of the step
    grad_norms: list[float]  # before clipping, one per update
    logprobs: list[np.ndarray]  # trainer log-probs of each sample's response tokens (before the update)
    tokens: int


def group_advantages(rewards: Sequence[float], group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean(group)) / (std(group) + eps), per group of `group_size` consecutive samples."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).view(-1)


def ppo_clip_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """Per-token PPO-clip loss (DAPO-style asymmetric clip); `adv` broadcasts over tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped)
