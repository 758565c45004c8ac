"""Crash a run the way a real failure does: SIGKILL its trainer process mid-run.

The pid comes from the run's own ledger header (placement), so the kill can only hit that run's
trainer, never an actor of an earlier run that Ray is still tearing down."""

import os
import signal
import threading
import time
from pathlib import Path

from detrl.checkpoints import latest_checkpoint
from detrl.ledger import read_ledger


def kill_trainer_when(
    root: Path,
    pattern: str,
    iterations: int,
    stop: threading.Event | None = None,
    timeout: float = 600,
    rank: int = 0,
    checkpointed: bool = False,
) -> bool:
    """SIGKILL trainer `rank` of the run whose ledger matches `pattern` under `root`, once that ledger
    holds `iterations` iteration records (and, with `checkpointed`, once the run has a finished checkpoint:
    it is saved after its iteration's record). Returns whether it killed it."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (stop and stop.is_set()):
        for path in root.glob(pattern):
            led = read_ledger(path)
            pid = (led.header or {}).get("placement", {}).get(f"trainer{rank}", {}).get("pid")
            ready = not checkpointed or latest_checkpoint(path.parent) is not None
            if pid and len(led.iterations) >= iterations and ready:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return False
                return True
        time.sleep(0.02)
    return False
