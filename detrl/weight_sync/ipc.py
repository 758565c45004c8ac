"""Weights as one flattened GPU bucket on the trainer's GPU, handed to SGLang by CUDA IPC handle (no
copy through the host). The trainer keeps the bucket until the engine has loaded it (`release`); the
engine then compares its own checksum of every parameter with the one the trainer computed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..tensor_hash import tensor_digests


def preload() -> None:
    """Import the SGLang modules `export` uses (long in a fresh process on a fresh host), so a trainer
    does it while its engine starts rather than in the first weight sync. No CUDA context is made."""
    import sglang.srt.managers.mm_utils
    import sglang.srt.utils.patch_torch
    import sglang.srt.weight_sync.tensor_bucket  # noqa: F401


def warm() -> None:
    """Compile the GPU checksum that `export` computes for the engine's proof (Triton kernels, built on
    first use; on a host with an empty cache that is iteration 0's sync). The tensor spans more than one
    of the kernel's tiles, so its reduction kernel is built too."""
    from sglang.srt.managers.mm_utils import tensor_hash

    tensor_hash(torch.zeros(4 * 8192, dtype=torch.int32, device="cuda"))


def pack(named: Mapping[str, torch.Tensor]) -> tuple[bytes, Any]:
    """(payload, bucket): GPU tensors flattened into one buffer and a CUDA IPC handle to it. The caller
    keeps `bucket` alive until the engine has loaded from it."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    monkey_patch_torch_reductions()  # names the GPU by UUID: the engine's process may number it differently
    bucket = FlattenedTensorBucket(named_tensors=list(named.items()))
    torch.cuda.synchronize()  # the bucket is written before another process reads it
    payload = MultiprocessingSerializer.serialize(
        {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    )
    return payload, bucket


def export(trainer: Any, dtype: str, update: bool, hash_algo: str) -> tuple[bytes | None, Any, Any]:
    """The payload (None when only the proof is asked for), the ledger digests, and the checksums the
    engine must report. The bucket stays alive in this process until `release`."""
    from ..rollout.sglang import expected_checksums

    tensors = trainer.export_hf(dtype, device="cuda")
    if tensors is None:
        return None, None, None
    payload = None
    if update:
        payload, trainer_bucket = pack(tensors)
        _held.append(trainer_bucket)
    return payload, tensor_digests(tensors, hash_algo), expected_checksums(tensors)


def load(engine: Any, payload: bytes | None, expected: Mapping[str, str], update: bool) -> list[str]:
    if payload is not None:
        engine.update_weights_ipc(payload)
    return list(engine.verify_checksums(expected))


_held: list[Any] = []  # this trainer process's bucket, alive until the engine has loaded it


def release() -> None:
    _held.clear()
