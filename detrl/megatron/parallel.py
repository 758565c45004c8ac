"""torch.distributed and Megatron's parallel state for one trainer process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from . import cpu
from .store import tcp_store


@contextlib.contextmanager
def model_parallel(
    rank: int = 0, world_size: int = 1, *, backend: str | None = None, store: Any = None, tp: int = 1, seed: int = 0
) -> Iterator[None]:
    """torch.distributed + Megatron parallel state for this process, meeting the other ranks through
    `store` (default: a store of its own, for one process); torn down on exit (reused as is when the
    caller already set it up)."""
    cpu.install()
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        yield
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if store is None:
        if world_size != 1:
            raise ValueError("model_parallel: more than one rank needs the store they share")
        store = tcp_store("127.0.0.1", 0, 1, is_master=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(torch.cuda.current_device())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(seed)  # the attention layers fork this tracker
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
