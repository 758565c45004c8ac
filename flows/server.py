"""Prefect's temporary server, for a flow run with no PREFECT_API_URL: its settings, and its start ahead.

A local run (`python -m flows.detrl_flow`, the benchmarks) starts Prefect's temporary server at the flow's
first call, after the flow module's imports (torch, transformers, Ray, Prefect), and waits for it; the
server's own start is mostly imports too, in its own process. `start_ahead` starts it in a thread before
those imports, so the two overlap; `wait` hands the flow a server that answers. A run against a real server
(PREFECT_API_URL, a deployment's worker) starts nothing."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

# The temporary server must not try to send telemetry: offline it logs an ERROR a user cannot act on. It
# must also be given time to start: on a fresh host it first creates and migrates its database, which can
# outlast Prefect's default timeout, and the flow then fails before its first task. Set before Prefect reads
# its settings; an explicit setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def start_ahead() -> Callable[[], None]:
    """Start the temporary server in a thread if the flow will need one; the returned `wait` blocks until it
    answers (and raises what its start raised). Call `wait` before the flow: Prefect's client takes a server
    that is starting for one that is up, and would send its first request too early."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    failed: list[BaseException] = []

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except BaseException as e:  # handed to wait(), in the flow's thread
            failed.append(e)

    thread = threading.Thread(target=start, name="prefect-server-ahead", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait
