"""detrl.reaper without Ray: the watcher stops a dead driver's session processes; neither a failed poll nor
a poll that sees none of the session's processes ends its watch while the driver lives; `stop` ends it.
(A real kill -9 of a driver mid-run: test_ops.)"""

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


def test_while_the_driver_lives_the_watch_goes_on_though_its_session_shows_no_process(tmp_path):
    """The one exit the watcher took by itself: a poll that saw none of the session's processes, the driver
    alive. A driver that shuts its Ray down now stops the watcher (`stop`)."""
    session = tmp_path / "session_2026-12-07_00-00-00_000000_2"
    driver = _sleeper()
    member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)", f"--session-dir={session}"])
    result: list[int] = []
    watcher = threading.Thread(target=lambda: result.append(reaper.watch(driver.pid, str(session), 0.05)))
    try:
        watcher.start()
        member.wait(30)
        time.sleep(1.0)  # twenty polls with the member gone and the driver alive
        assert watcher.is_alive(), (session / "logs" / "detrl-reaper.log").read_text()
        driver.kill()
        driver.wait()
        watcher.join(30)
        assert result == [0], result
    finally:
        if psutil.pid_exists(driver.pid):
            driver.kill()
        driver.wait()


def test_stop_ends_the_watch_of_a_live_driver_and_says_so(tmp_path):
    session = tmp_path / "session_2026-12-07_00-00-00_000000_3"
    log = session / "logs" / "detrl-reaper.log"
    watcher = reaper.start(str(session))  # this process is its driver
    deadline = time.time() + 60
    while not (log.exists() and "watching driver" in log.read_text()):
        assert watcher.poll() is None and time.time() < deadline, "the watcher never started its watch"
        time.sleep(0.1)
    reaper.stop(watcher)
    assert watcher.returncode == 0
    assert "stopped: the driver shut its Ray down" in log.read_text()
