"""Stop what a run started when its driver dies without cleaning up (kill -9, OOM killer).

A local Ray started by `ray.init` leaves its agents (ray::DashboardAgent, ray::RuntimeEnvAgent) and
sometimes idle workers running under pid 1 when the driver is killed. The driver starts this watcher
in its own session; every second it records the processes of the driver's Ray session (those naming
the session directory, and all their descendants), and once the driver is gone it kills every one of
them still alive. A driver that shuts its Ray down stops the watcher itself (`stop`): the watcher never
concludes from what it sees that Ray is down, since one poll that saw none of the session's processes,
the driver alive, once ended a watch whose driver was then killed (tests/test_ops.py's kill -9 test).

It writes what it did (its start, each poll that failed, what it killed and why it stopped) to
`SESSION_DIR/logs/detrl-reaper.log`, beside Ray's own logs: a leftover process can then be traced.

    python -m detrl.reaper DRIVER_PID SESSION_DIR
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import psutil


def _session_processes(session: str) -> dict[int, float]:
    """pid -> create_time of the processes naming `session`, and their descendants."""
    found: dict[int, float] = {}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            if p.pid != me and any(session in part for part in (p.info["cmdline"] or [])):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _kill(known: dict[int, float]) -> int:
    alive = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if pid != os.getpid() and p.create_time() == created:  # not a new process that reused the pid
                p.kill()
                alive.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(alive, timeout=10)
    return len(alive)


def _log(session_dir: str, line: str) -> None:
    try:
        logs = Path(session_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "detrl-reaper.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    except OSError:
        pass  # a log it cannot write must not stop the watch


def watch(driver_pid: int, session_dir: str, interval: float = 1.0) -> int:
    try:
        driver = psutil.Process(driver_pid)
        born = driver.create_time()
    except psutil.NoSuchProcess:
        _log(session_dir, f"driver {driver_pid} already gone: nothing watched")
        return 0
    session = session_dir.rstrip("/").rsplit("/", 1)[-1]
    _log(session_dir, f"watching driver {driver_pid}")
    known: dict[int, float] = {}
    while True:
        # one failed poll (a psutil error of a kind not foreseen, a /proc read under memory pressure) must not
        # end the watch: a watcher that dies silently leaves exactly the processes it exists to stop
        try:
            try:
                driver_alive = (
                    driver.is_running() and driver.create_time() == born and driver.status() != psutil.STATUS_ZOMBIE
                )
            except psutil.NoSuchProcess:
                driver_alive = False
            if not driver_alive:
                known.update(_session_processes(session))
                killed = _kill(known)
                _log(session_dir, f"driver {driver_pid} gone: killed {killed} of {len(known)} known processes")
                return killed
            known.update(_session_processes(session))
        except Exception:
            _log(session_dir, "a poll failed, watching on:\n" + traceback.format_exc())
        time.sleep(interval)


def start(session_dir: str) -> subprocess.Popen:
    """Start the watcher for this process's Ray session; it outlives a SIGKILL of this process."""
    return subprocess.Popen(
        [sys.executable, "-m", "detrl.reaper", str(os.getpid()), session_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(watcher: subprocess.Popen) -> None:
    """The driver shut its Ray down: end the watch (its log says so)."""
    watcher.terminate()
    try:
        watcher.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watcher.kill()
        watcher.wait()


def _main(driver_pid: int, session_dir: str) -> int:
    def stopped(signum: int, frame: object) -> None:
        _log(session_dir, "stopped: the driver shut its Ray down")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)
    watch(driver_pid, session_dir)  # returns once the driver is gone and its session's processes are killed
    return 0


if __name__ == "__main__":
    sys.exit(_main(int(sys.argv[1]), sys.argv[2]))
