"""How the trainer's weights reach the rollout engine, and the proof that the engine holds exactly
them: one transport per module behind one interface (slime's `update_weight_from_{tensor,distributed,
disk}` shape).

- `object_store`: CPU copies through Ray's object store; any placement and either engine.
- `ipc`: one GPU bucket on the trainer's GPU, loaded by CUDA IPC handle; SGLang on the trainer's GPU.

A transport module has two functions, each run inside an actor:
- `export(trainer, dtype, update, hash_algo) -> (payload, digests, expected)` on every trainer rank of
  the first tensor-parallel group (payload None on other TP ranks, or when `update` is false and the
  engine needs only the proof);
- `load(engine, payload, expected, update) -> bad tensor names` in the rollout actor;
and may keep state in the trainer's process until `release()`, and may compile its first-use kernels in
`warm()`. `sync` drives either one the same way."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..config import RunConfig

TRANSPORTS = ("object_store", "ipc")


def transport_for(cfg: RunConfig) -> str:
    """The transport a run uses: CUDA IPC when the engine shares the trainer's GPU, unless configured off."""
    return "ipc" if cfg.ipc_weight_sync else "object_store"


def module(name: str) -> ModuleType:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {name!r}; known: {', '.join(TRANSPORTS)}")
    return importlib.import_module(f"{__name__}.{name}")


def warm(group: Any, transport: str) -> None:
    """Have the trainers that export compile the transport's first-use kernels now, while the engine runs
    its self-test, instead of in iteration 0's sync. Not waited for: a trainer runs its calls in order, so
    its first export starts after it, and a failure here fails that export the same way."""
    if hasattr(module(transport), "warm"):
        for t in group.trainers[: group.cfg.resources.tensor_parallel]:
            t.warm_weights.remote(transport)


def sync(group: Any, transport: str, it: int, update: bool) -> tuple[dict[str, str], list[str], dict[str, float]]:
    """(digest of every tensor the trainer sent, tensors the engine holds otherwise, seconds of the
    trainer's export and of the engine's load and proof, each in its own process) for `group`
    (`detrl.ray.group.Workers`). The payload goes from trainer rank 0 to the engine as a Ray object
    reference: whatever it holds never passes through the driver."""
    tp, dtype = group.cfg.resources.tensor_parallel, group.engine_info["dtype"]
    algo = group.cfg.ledger.tensor_hash
    exports = [
        t.export_weights.options(num_returns=4).remote(transport, dtype, update, algo) for t in group.trainers[:tp]
    ]
    payload, digests, expected, export_s = exports[0]
    bad, load_s = group.wait(group.rollout.load_weights.remote(transport, payload, expected, update), "weight sync", it)
    sent = group.wait(digests, "weight sync", it)
    group.wait([ref for refs in exports[1:] for ref in refs], "weight sync", it)
    group.wait(group.trainers[0].release_weights.remote(transport), "weight sync", it)
    return sent, bad, {"export_s": group.wait(export_s, "weight sync", it), "load_s": load_s}
