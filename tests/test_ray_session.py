"""detrl.ray.session: the local Ray a run starts, in a fresh process (the suite's own workers may hold a Ray
already)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.integration
def test_a_local_ray_prestarts_no_idle_worker_and_its_release_stops_the_reaper():
    """Each det-rl actor has a runtime env, so Ray starts it a worker of its own: the idle workers a local
    Ray prestarts (one per CPU) would only boot beside the runs' start and hold memory until the end."""
    code = (
        "import json, time, psutil\n"
        "from detrl.config import load_config\n"
        "from detrl.ray import session\n"
        "session.ensure_ray(load_config('tiny-cpu'))\n"
        "seen, end = set(), time.time() + 8\n"
        "while time.time() < end:\n"
        "    for p in psutil.Process().children(recursive=True):\n"
        "        try:\n"
        "            seen.add(' '.join(p.cmdline())[:300])\n"
        "        except psutil.Error:\n"
        "            pass\n"
        "    time.sleep(0.2)\n"
        "session.release_ray()\n"
        "left = [' '.join(p.cmdline()) for p in psutil.Process().children(recursive=True)]\n"
        "print(json.dumps(sorted(seen)))\n"
        "print(json.dumps(left))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    seen, left = (json.loads(line) for line in r.stdout.splitlines()[-2:])
    assert any("raylet" in s for s in seen), seen  # the watch saw Ray's own processes
    idle = [s for s in seen if "ray::IDLE" in s or "default_worker.py" in s]
    assert not idle, idle
    assert any("detrl.reaper" in s for s in seen), seen  # the Ray had its reaper
    assert not [c for c in left if "detrl.reaper" in c], left  # which release_ray stopped
