"""What both actors answer the same way: who and where they are, and the paths they need."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from ..config import DETERMINISM_ENV


def process_info(role: str) -> dict[str, Any]:
    """A worker's identity and the environment it really has (read back, not assumed)."""
    from ..determinism import fa3_importable, read_env  # torch: not before the rollout actor's `prepare`

    return {
        "role": role,
        "pid": os.getpid(),
        "env": read_env(list(DETERMINISM_ENV)),
        "fa3": fa3_importable(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
    }


def need_paths(*paths: str) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"{missing} not found on node {socket.gethostname()}: on a Ray cluster the "
            "cache (--cache, DETRL_CACHE) must be on a filesystem every node mounts"
        )


def checks_as_dicts(checks: list[Any]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]
