"""This process's Ray: started (or joined) by the first run that needs it, shared by runs side by side,
shut down by the last one out. A local Ray gets a reaper that stops it if the driver dies uncleanly."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from .. import reaper
from ..config import RunConfig

_LOCK = threading.Lock()
_users = 0  # runs in this process using the local Ray that ensure_ray started
_watcher: Any = None  # the reaper of that Ray, stopped when this process shuts it down
_NO_PRESTART = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


def _node() -> Any:
    """Ray's node object of this driver. No public API names the session or log directory: this is the
    one place det-rl reaches into Ray's private state."""
    return getattr(ray._private.worker, "_global_node", None)


def session_dir() -> Path | None:
    node = _node()
    return Path(node.get_session_dir_path()) if node is not None else None


def logs_dir() -> Path | None:
    node = _node()
    return Path(node.get_logs_dir_path()) if node is not None else None


def ensure_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster or start a local one. Returns whether the caller must
    `release_ray()` when done: the last run out of a Ray this process started shuts it down."""
    global _users, _watcher
    with _LOCK:
        if ray.is_initialized():
            if _users:
                _users += 1
                return True
            return False
        # "local": a fresh instance even when `ray start` left a cluster behind; joining one is explicit
        local = not cfg.resources.ray_address
        ray.init(
            address=cfg.resources.ray_address or "local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
            log_to_driver=True,
            # a local Ray prestarts one idle worker per CPU, which no det-rl actor can use (each has a
            # runtime env, so Ray starts it a worker of its own): they would only boot beside the runs' own
            # start and hold memory until the end (benchmarks/results/cpu-ray-prestart-*). A cluster keeps
            # its own settings.
            _system_config=_NO_PRESTART if local else None,
        )
        _users = 1
    if local:  # our own local Ray: stop it even if this process is killed
        session = session_dir()
        if session is not None:
            _watcher = reaper.start(str(session))
    return True


def release_ray() -> None:
    global _users, _watcher
    with _LOCK:
        _users -= 1
        if _users <= 0:
            _users = 0
            ray.shutdown()
            if _watcher is not None:  # Ray is down by this process's hand: nothing is left to reap
                reaper.stop(_watcher)
                _watcher = None


@contextlib.contextmanager
def shared_ray(cfg: RunConfig) -> Iterator[None]:
    """Hold this process's Ray for runs started in other threads (side by side): Ray is started here,
    in the calling (main) thread, where it can install its signal handlers."""
    started = ensure_ray(cfg)
    try:
        yield
    finally:
        if started:
            release_ray()
