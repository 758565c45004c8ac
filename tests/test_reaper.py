"""detrl.reaper without Ray: the watcher stops a dead driver's session processes, and a failed poll does
not end its watch. (A real kill -9 of a driver mid-run: test_ops.)"""

import subprocess
import sys
import threading
import time

import psutil

from detrl import reaper


def _sleeper(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv])


def test_a_poll_that_fails_does_not_end_the_watch_and_the_dead_drivers_session_is_killed(tmp_path, monkeypatch):
    session = tmp_path / "session_2026-12-07_00-00-00_000000_1"
    driver, member = _sleeper(), _sleeper(f"--session-dir={session}")
    real, calls = reaper._session_processes, []

    def flaky(name: str) -> dict[int, float]:
        calls.append(name)
        if len(calls) == 2:
            raise OSError("a /proc read that failed")
        return real(name)

    monkeypatch.setattr(reaper, "_session_processes", flaky)
    result: list[int] = []
    watcher = threading.Thread(target=lambda: result.append(reaper.watch(driver.pid, str(session), 0.05)))
    try:
        watcher.start()
        while len(calls) < 4:  # past the failed poll, and watching on
            assert watcher.is_alive(), "the watch ended at a failed poll"
            time.sleep(0.05)
        driver.kill()
        driver.wait()
        watcher.join(30)
        assert result == [1], result  # the member, killed once the driver was gone
        member.wait(10)  # (the watcher, here in this process, may have reaped it already)
        assert not psutil.pid_exists(member.pid)
        log = (session / "logs" / "detrl-reaper.log").read_text()
        assert "a poll failed, watching on" in log and "OSError: a /proc read that failed" in log, log
        assert f"driver {driver.pid} gone: killed 1 of 1 known processes" in log, log
    finally:
        for p in (driver, member):
            if psutil.pid_exists(p.pid):
                p.kill()
            p.wait()
