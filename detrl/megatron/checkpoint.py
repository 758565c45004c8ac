"""Checkpoint I/O: HF safetensors in, Megatron torch_dist (`dist_checkpointing`) in and out. Megatron is
imported where a checkpoint is read or written: the driver asks only whether one is complete, and a
Megatron import costs it seconds per run."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def save_dist_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))  # type: ignore[operator]


def load_dist_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    from megatron.core import dist_checkpointing

    from .model import load_state_exact

    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))  # type: ignore[operator]
    load_state_exact(model, {k: v for k, v in state.items() if not k.endswith("_extra_state")})


def checkpoint_complete(ckpt_dir: str | Path) -> bool:
    """A torch_dist checkpoint has its metadata and at least one shard file."""
    d = Path(ckpt_dir)
    return (d / ".metadata").is_file() and (d / "metadata.json").is_file() and any(d.glob("*.distcp"))
