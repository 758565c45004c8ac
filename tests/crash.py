"""Crash a run the way a real failure does: SIGKILL its trainer process mid-run.

The pid comes from the run's own ledger header (placement), so the kill can only hit that run's
trainer, never an actor of an earlier run that Ray is still tearing down."""

import json
import os
import signal
import threading
import time
from pathlib import Path


def _trainer_pid(text: str, rank: int) -> int | None:
    first = text.split("\n", 1)[0]
    try:
        header = json.loads(first)
    except ValueError:
        return None
    return header.get("placement", {}).get(f"trainer{rank}", {}).get("pid")


def kill_trainer_when(root: Path, pattern: str, iterations: int, stop: threading.Event | None = None,
                      timeout: float = 600, rank: int = 0) -> bool:
    """SIGKILL trainer `rank` of the run whose ledger matches `pattern` under `root`, once that ledger
    holds `iterations` iteration records. Returns whether it killed it."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (stop and stop.is_set()):
        for ledger in root.glob(pattern):
            text = ledger.read_text()
            pid = _trainer_pid(text, rank)
            if pid and text.count('"kind":"iteration"') >= iterations:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return False
                return True
        time.sleep(0.02)
    return False
