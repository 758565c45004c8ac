"""SGLang's scheduler and detokenizer processes, started ahead of the engine.

`sgl.Engine` spawns its scheduler and its detokenizer once this process has imported SGLang, and each
spawned process imports SGLang again before it does anything: two imports of SGLang in series, the
larger part of a warm engine start (benchmarks/results/*startup*.json). `Ahead` spawns those processes
first, so that they import SGLang while this process does, and `serving` hands each its work when
SGLang launches it: while the engine starts, SGLang's engine module sees a `multiprocessing` whose
`Process(target=...)`, for a target in a module imported ahead, is the process started for it. SGLang's
own launch code runs unchanged (ranks, GPU ids, pipes); the work is the same function with the same
arguments, in a spawned process, as without this module.

What a process started ahead cannot take, it does not take: SGLang then starts a fresh process as it
always does, and `report` says why. That is when the process is not ready (its import failed or it
died), when the interpreter SGLang would spawn changed (NUMA binding wraps it), or when the
environment SGLang launches with differs from the one the process started with in a key that is read
only as a process starts (`LD_*`, `PYTHON*`), or in a `CUDA_*` key after the import initialized CUDA.
Every other difference is applied before the work starts.

`prepare` is what an engine sets and starts before its own start: the variables its processes read
and these processes. Nothing here imports torch, nor does the rollout actor before it calls `prepare`:
the processes start, and begin their imports, before the actor itself spends seconds importing torch.
`Start.import_engine` then imports SGLang's engine in this process, in a thread, once the caller has
imported what its own work meanwhile imports (see its docstring for why that order matters).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import sglang_plugin

if TYPE_CHECKING:
    from ..config import SGLangConfig

# The modules of `sgl.Engine`'s `run_scheduler_process_func` and `run_detokenizer_process_func`.
SGLANG_MODULES = ("sglang.srt.managers.scheduler", "sglang.srt.managers.detokenizer_manager")
# What SGLang's launch sets in this process before it spawns (`_set_envs_and_config`, whatever was set
# before) and CUDA reads as it starts: set here first, so that an import that initializes CUDA sees
# them too. Should SGLang set other values, the hand-over sees the difference and SGLang starts its
# own process.
SGLANG_LAUNCH_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "8", "CUDA_MODULE_LOADING": "AUTO"}
_READ_AT_START = ("LD_", "PYTHON")


def _serve(conn: multiprocessing.connection.Connection, module: str) -> None:
    """The process started ahead: import `module`, say so, then run the work it is handed."""
    t = time.perf_counter()
    try:
        importlib.import_module(module)
    except BaseException as e:
        conn.send({"ready": False, "why": f"importing {module} failed: {type(e).__name__}: {e}"})
        return
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_initialized())
    conn.send({"ready": True, "import_s": round(time.perf_counter() - t, 2), "cuda_initialized": cuda})
    try:
        target, args, kwargs, changed, removed = conn.recv()
    except EOFError:  # the engine took another process, or never started
        return
    conn.close()
    for key in removed:
        os.environ.pop(key, None)
    os.environ.update(changed)
    target(*args, **kwargs)


class _Started:
    """One process started ahead for the functions of `module`."""

    def __init__(self, module: str):
        ctx = multiprocessing.get_context("spawn")
        self.module, self.env, self.executable = module, dict(os.environ), multiprocessing.spawn.get_executable()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, module), name=f"detrl-ahead:{module}")
        self.proc.start()
        child.close()
        self.taken = False
        self.state: dict[str, Any] = {}

    def ready(self) -> dict[str, Any]:
        """The process's word once its import is done (waits for it)."""
        if not self.state:
            try:
                self.state = dict(self.conn.recv())
            except (EOFError, OSError):
                self.state = {"ready": False, "why": f"the process ended (exit code {self.proc.exitcode})"}
        return self.state

    def refusal(self) -> str | None:
        """Why the work launched now cannot go to this process, or None."""
        state = self.ready()
        if not state["ready"]:
            return str(state["why"])
        if multiprocessing.spawn.get_executable() != self.executable:
            return "the interpreter SGLang spawns changed"
        changed = _differing(self.env, dict(os.environ))
        at_start = sorted(k for k in changed if k.startswith(_READ_AT_START))
        if at_start:
            return f"the environment changed in keys read as a process starts: {at_start}"
        cuda = sorted(k for k in changed if k.startswith("CUDA_"))
        if cuda and state["cuda_initialized"]:
            return f"the import initialized CUDA and the environment changed in {cuda}"
        return None

    def hand(self, target: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        now = dict(os.environ)
        changed = {k: now[k] for k in _differing(self.env, now) if k in now}
        removed = [k for k in self.env if k not in now]
        self.conn.send((target, tuple(args), dict(kwargs), changed, removed))
        self.conn.close()

    def stop(self) -> None:
        """An untaken process: stop it (it may still be importing)."""
        self.conn.close()
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout=30)


def _differing(before: Mapping[str, str], after: Mapping[str, str]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


class _Launched:
    """What SGLang's `mp.Process(...)` returns for a target a process was started ahead for: its
    `start()` hands the work over, or (with the reason in the report) starts a fresh process."""

    def __init__(self, ahead: Ahead, started: _Started, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._ahead, self._started, self._call = ahead, started, (target, args, kwargs)
        self._proc: Any = started.proc

    def start(self) -> None:
        """Waits for the process's import: only then can it say whether it can take the work."""
        target, args, kwargs = self._call
        why = self._started.refusal()
        if why is None:
            self._started.hand(target, args, kwargs)
        else:
            self._started.stop()
            self._proc = multiprocessing.Process(target=target, args=args, kwargs=kwargs)
            self._proc.start()
        state = self._started.state
        self._ahead.log.append(
            {"module": self._started.module, "pid": self._proc.pid, "import_s": state.get("import_s"), "refused": why}
        )

    def __getattr__(self, name: str) -> Any:  # pid, is_alive, join, exitcode, kill, ...: the process's
        return getattr(self._proc, name)


class _Multiprocessing:
    """`multiprocessing` as SGLang's engine module sees it while `serving`."""

    def __init__(self, ahead: Ahead):
        self._ahead = ahead

    def Process(self, *args: Any, target: Any = None, **kwargs: Any) -> Any:
        # SGLang passes target, args and kwargs by name; anything else (a name, daemon) gets a fresh process
        started = self._ahead.take(target) if not args and set(kwargs) <= {"args", "kwargs"} else None
        if started is None:
            kwargs["target"] = target
            return multiprocessing.Process(*args, **kwargs)
        return _Launched(self._ahead, started, target, tuple(kwargs.pop("args", ())), dict(kwargs.pop("kwargs", {})))

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


class Ahead:
    """Processes started now for the SGLang engine this process is about to start (`serving`)."""

    def __init__(self, modules: tuple[str, ...] = SGLANG_MODULES, env: Mapping[str, str] | None = None):
        os.environ.update(SGLANG_LAUNCH_ENV if env is None else env)
        self.started = [_Started(m) for m in modules]
        self.log: list[dict[str, Any]] = []

    def take(self, target: Any) -> _Started | None:
        """The untaken process started for `target`'s module, or None."""
        for s in self.started:
            if not s.taken and getattr(target, "__module__", None) == s.module:
                s.taken = True
                return s
        return None

    @contextlib.contextmanager
    def serving(self, module: ModuleType) -> Iterator[None]:
        """While inside, `module`'s `mp.Process(target=...)` takes a process started ahead for the
        target's module."""
        saved = module.mp
        module.mp = _Multiprocessing(self)  # type: ignore[attr-defined]
        try:
            yield
        finally:
            module.mp = saved  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop every process that took no work (call it once the engine started, or failed to)."""
        for s in self.started:
            if not s.taken:
                s.taken = True
                s.stop()

    def report(self) -> list[dict[str, Any]]:
        """Per process SGLang launched where one was started ahead: the module, the pid of the process
        that runs the work, the import's seconds, and why the process started ahead was refused (None:
        it took the work)."""
        return list(self.log)


@dataclass
class Start:
    """What an engine's processes read, set before this process imports SGLang (`prepare`)."""

    kernels: str  # "detrl": det-rl's RMSNorm loads into SGLang; "sglang": SGLang's own kernels
    reports: Path  # where each process of the engine reports what the plugin did
    ahead: Ahead | None  # the engine's processes, started ahead
    importing: threading.Thread | None = None  # this process's own import of SGLang, started ahead

    def import_engine(self) -> None:
        """Import SGLang's engine in this process, in a thread, so that the caller's work before the
        engine's start (the workers' env check) overlaps it. Call it only once the caller imported every
        module that work imports: two threads importing one module graph at once can each wait for a
        module the other is importing, and Python breaks that deadlock by handing one of them the module
        half-initialised (torch._inductor's, which both `torch.use_deterministic_algorithms` and SGLang
        import, failed a run that way)."""
        if self.ahead is not None and self.importing is None:
            self.importing = threading.Thread(target=_import_engine, name="detrl-import-sglang", daemon=True)
            self.importing.start()

    def imported(self) -> None:
        """Wait for this process's import of SGLang started by `import_engine`, so that no module of SGLang
        is ever imported by two threads at once (the engine imports it next)."""
        if self.importing is not None:
            self.importing.join()
            self.importing = None

    def close(self) -> None:
        """Stop the processes started ahead that no engine took (all of them, when none started)."""
        if self.ahead is not None:
            self.ahead.close()

    def abandon(self) -> None:
        """No engine will start from this: stop its processes and remove the reports' folder, which only
        an engine's start reads (and removes)."""
        self.close()
        shutil.rmtree(self.reports, ignore_errors=True)


def prepare(cfg: SGLangConfig, deterministic: bool) -> Start:
    """Set what the next engine's processes read and start them ahead (`cfg.start_ahead`). Cheap here;
    a caller that has other work before the engine (the rollout actor's env check) calls it first."""
    kernels = "detrl" if deterministic and cfg.kernels == "detrl" else "sglang"
    if kernels == "detrl":
        sglang_plugin.plugin_env(sglang_plugin.path_folder())
    reports = sglang_plugin.request(kernels == "detrl")
    return Start(kernels, reports, Ahead() if cfg.start_ahead else None)


def _import_engine() -> None:
    try:
        importlib.import_module("sglang.srt.entrypoints.engine")
    except BaseException:  # the engine's own import raises it again, where it is reported
        pass
