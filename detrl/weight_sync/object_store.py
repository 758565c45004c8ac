"""Weights as CPU tensors through Ray's object store. The engine loads them (when `update`) and then
checks what it holds against them: SGLang by its own per-parameter checksum, the hf engine bit for bit."""

from __future__ import annotations

from typing import Any

from ..tensor_hash import tensor_digests


def export(trainer: Any, dtype: str, update: bool, hash_algo: str) -> tuple[Any, Any, None]:
    tensors = trainer.export_hf(dtype)
    if tensors is None:  # a TP rank other than 0: it took part in the gather
        return None, None, None
    return tensors, tensor_digests(tensors, hash_algo), None


def load(engine: Any, payload: Any, expected: Any, update: bool) -> list[str]:
    if update:
        engine.update_weights(payload)
    return list(engine.verify_weights(payload))


def release() -> None:
    """Nothing is held: the object store frees the tensors once the engine has them."""
