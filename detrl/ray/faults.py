"""Fault injection for the tests, in one place. A worker whose `resources.worker_env` sets
DETRL_HANG=<method> sleeps in that method until it is killed; DETRL_CRASH=<method> prints a message and
exits there, as an engine that refuses to start does; with DETRL_CRASH_CHILD_S=<seconds> it first forks
a child that lives that long, as Megatron's checkpoint writers outlive a worker killed mid-save. The hook
wraps the actor class at creation (`inject`); the production methods carry no test code."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

HANG_ENV, CRASH_ENV, CHILD_ENV = "DETRL_HANG", "DETRL_CRASH", "DETRL_CRASH_CHILD_S"


def _fault(method: str) -> None:
    if os.environ.get(HANG_ENV) == method:
        while True:
            time.sleep(3600)
    if os.environ.get(CRASH_ENV) == method:
        child_s = float(os.environ.get(CHILD_ENV) or 0)
        if child_s > 0 and os.fork() == 0:
            time.sleep(child_s)
            os._exit(0)
        print(f"RuntimeError: injected crash in {method} ({CRASH_ENV})", file=sys.stderr, flush=True)
        os._exit(1)


def inject(cls: type, env: Mapping[str, Any]) -> type:
    """`cls`, or a subclass whose methods named by the role's DETRL_HANG/DETRL_CRASH fault first. The
    fault itself reads the worker's own environment, where the runtime env put the same variables."""
    named = {str(env[k]) for k in (HANG_ENV, CRASH_ENV) if env.get(k)}
    if not named:
        return cls
    missing = sorted(m for m in named if not callable(getattr(cls, m, None)))
    if missing:
        raise ValueError(f"{HANG_ENV}/{CRASH_ENV}: {cls.__name__} has no method {missing}")

    def faulty(name: str) -> Any:
        method = getattr(cls, name)

        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            _fault(name)
            return method(self, *args, **kwargs)

        return call

    return type(cls.__name__, (cls,), {m: faulty(m) for m in named})
