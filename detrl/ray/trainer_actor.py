"""One trainer rank as a Ray actor. Megatron is imported on first use (`preload`, or `setup`), not when
the actor starts: the environment check answers at once and the import overlaps the engine's start."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray

from .. import quiet, weight_sync
from ..config import RunConfig, config_from_json
from ..determinism import apply_process_settings, fingerprint
from .actor_common import checks_as_dicts, need_paths, process_info

if TYPE_CHECKING:
    from ..trainer import GRPOTrainer, Sample


_LOOPBACK = "127.0.0.1"


def _store_host(master_addr: str) -> str:
    """How this rank reaches rank 0's store: by loopback on rank 0's node. The store names each client
    by a reverse lookup of its address, which for a node address fails on a host without DNS and logs
    a C++ warning no user can act on; loopback resolves from /etc/hosts."""
    return _LOOPBACK if master_addr == ray.util.get_node_ip_address() else master_addr


class TrainerActor:
    def __init__(self, cfg_json: str, hf_dir: str, ckpt: str, rank: int, world_size: int):
        quiet.install()
        self.cfg = config_from_json(cfg_json)
        self.hf_dir, self.ckpt, self.rank, self.world_size = hf_dir, ckpt, rank, world_size
        self.role = f"trainer{rank}"
        self.trainer: GRPOTrainer | None = None
        self._store: Any = None

    def env(self) -> dict[str, Any]:
        return process_info(self.role)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and the port of the torch.distributed store it now holds open: the ranks'
        meeting point, on rank 0's node rather than the driver's. The OS picks the port while the store
        binds it, so no other process can take it between choosing and binding."""
        from ..megatron.store import tcp_store

        # the store listens on every interface; rank 0 itself connects by loopback (see `_store_host`)
        self._store = tcp_store(_LOOPBACK, 0, self.world_size, is_master=True)
        return ray.util.get_node_ip_address(), self._store.port

    def preload(self, transport: str) -> None:
        """Import the trainer and the weight-sync transport while the engine starts."""
        import importlib

        importlib.import_module("detrl.trainer")
        mod = weight_sync.module(transport)
        if hasattr(mod, "preload"):
            mod.preload()

    def setup(self, master_addr: str, master_port: int) -> None:
        from ..megatron.store import tcp_store
        from ..trainer import GRPOTrainer

        need_paths(self.hf_dir, self.ckpt)
        store = self._store or tcp_store(_store_host(master_addr), master_port, self.world_size, is_master=False)
        apply_process_settings(self.cfg.determinism.enabled, self.cfg.seed, self.cfg.resources.cpu_threads)
        self.trainer = GRPOTrainer(
            self.cfg, self.hf_dir, self.ckpt, rank=self.rank, world_size=self.world_size, store=store
        )

    def fingerprint(self) -> dict[str, Any]:
        t = self._t
        return fingerprint(
            self.role, {"layout": {"dp": t.dp, "tp": t.tp, "pp": 1}, "dtype": t.dtype, "device": str(t.device)}
        )

    @property
    def _t(self) -> GRPOTrainer:
        assert self.trainer is not None, "setup() first"
        return self.trainer

    def train_step(self, samples: list[Sample], global_tokens: list[int]) -> Any:
        return self._t.train_step(samples, global_tokens)

    def export_weights(self, transport: str, dtype: str, update: bool, hash_algo: str) -> tuple[Any, Any, Any, float]:
        """The transport's export, and the seconds it took in this process."""
        t = time.perf_counter()
        out = weight_sync.module(transport).export(self._t, dtype, update, hash_algo)
        return (*out, time.perf_counter() - t)

    def warm_weights(self, transport: str) -> None:
        weight_sync.module(transport).warm()

    def release_weights(self, transport: str) -> None:
        weight_sync.module(transport).release()

    def weight_hashes(self) -> dict[str, str] | None:
        return self._t.weight_hashes()

    def check(self, fn: Callable[[str, RunConfig], list[Any]]) -> list[dict[str, Any]]:
        """Run a check function in this worker's process (doctor's worker checks)."""
        return checks_as_dicts(fn(self.role, self.cfg))

    def flip_bit(self, tensor: str, index: int, bit: int) -> None:
        self._t.flip_bit(tensor, index, bit)

    def save_checkpoint(self, path: str) -> None:
        self._t.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self._t.load_checkpoint(path)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
