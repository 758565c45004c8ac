"""torch.distributed's key-value store, where the trainer ranks meet. Apart from `parallel` so that rank 0
can open it without importing Megatron: the rendezvous then costs the torch import alone, and it runs
while the engine starts."""

from __future__ import annotations

from torch.distributed import TCPStore
from torch.distributed.constants import default_pg_timeout


def tcp_store(host: str, port: int, world_size: int, *, is_master: bool) -> TCPStore:
    """The master with port 0 binds one the OS picks (`.port`); it listens on every interface, and `host`
    is where this process's own client connects."""
    return TCPStore(host, port, world_size, is_master, timeout=default_pg_timeout, wait_for_workers=False)
