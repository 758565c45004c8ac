"""Weights as CPU tensors through Ray's object store. The engine loads them (when `update`) and then
checks what it holds against them: SGLang by its own per-parameter checksum, the hf engine bit for bit.

Each tensor travels as a NumPy view of its bytes: Ray writes NumPy arrays into the object store as
pickle-5 buffers and the reader maps them in place, where a torch tensor would be pickled through a
copy of its storage on both sides."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..tensor_hash import tensor_digests

Packed = dict[str, tuple[np.ndarray, str, tuple[int, ...]]]


def pack(tensors: Mapping[str, torch.Tensor]) -> Packed:
    """name -> (the tensor's bytes as uint8, its dtype's name, its shape); the tensors must be contiguous."""
    return {
        k: (v.reshape(-1).view(torch.uint8).numpy(), str(v.dtype).removeprefix("torch."), tuple(v.shape))
        for k, v in tensors.items()
    }


def unpack(packed: Packed) -> dict[str, torch.Tensor]:
    """The tensors `pack` was given, bit for bit, as views of the object store's read-only memory."""
    with warnings.catch_warnings():
        # read-only on purpose: both engines copy from the tensors or compare them, never write to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(a).view(getattr(torch, dt)).reshape(s) for k, (a, dt, s) in packed.items()}


def export(trainer: Any, dtype: str, update: bool, hash_algo: str) -> tuple[Any, Any, None]:
    tensors = trainer.export_hf(dtype)
    if tensors is None:  # a TP rank other than 0: it took part in the gather
        return None, None, None
    return pack(tensors), tensor_digests(tensors, hash_algo), None


def load(engine: Any, payload: Any, expected: Any, update: bool) -> list[str]:
    tensors = unpack(payload)
    if update:
        engine.update_weights(tensors)
    return list(engine.verify_weights(tensors))


def release() -> None:
    """Nothing is held: the object store frees the tensors once the engine has them."""
