"""Proof in a browser: start a Prefect server on 127.0.0.1, deploy det-rl/gsm8k, run it twice on
tiny-cpu (identical; a planted bit flip), and take headless Chromium screenshots of both flow runs
and their verdict and plot artifacts.

    .venv/bin/pip install -e ".[ui]" && apt-get install chromium   # once
    .venv/bin/python scripts/ui_screenshots.py --out docs/screenshots

Chromium is Debian's (/usr/bin/chromium, or --chromium PATH); playwright only drives it."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_terminal(api: str, run_id: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if fr["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return fr
        time.sleep(3)
    raise SystemExit(f"flow run {run_id} did not finish in {timeout} s")


def _artifact_ids(api: str, run_id: str) -> dict[str, str]:
    res = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}, timeout=10)
    return {a["key"]: a["id"] for a in res.json() if a.get("key")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="detrl-ui-"))
    port = _port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "DETRL_CACHE": str(tmp / "cache"),
        "DETRL_RUNS": str(tmp / "runs"),
        "DETRL_GOLDEN": str(tmp / "golden"),
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=open(tmp / "server.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]
    try:
        for _ in range(180):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        cli = lambda *args: subprocess.run(
            [*PREFECT, *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        cli("work-pool", "create", "detrl-process", "--type", "process")
        cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "gsm8k")
        procs.append(
            subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", "detrl-process"],
                env=env,
                cwd=ROOT,
                stdout=open(tmp / "worker.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        runs = {}
        for label, params in (("identical", []), ("planted", ['plant=["1:decoder.layers.1.mlp.linear_fc2.weight"]'])):
            args = ["deployment", "run", "det-rl/gsm8k", "--param", "profile=tiny-cpu", "--param", "steps=2"]
            for p in params:
                args += ["--param", p]
            run_id = re.search(r"UUID: ([0-9a-f-]{36})", cli(*args).stdout).group(1)
            fr = _wait_terminal(api, run_id)
            runs[label] = run_id
            print(f"{label}: flow run {fr['name']} {fr['state']['type']}: {fr['state'].get('message') or ''}")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            for label, run_id in runs.items():
                shots = {f"{label}-flow-run": f"{ui}/runs/flow-run/{run_id}"}
                arts = _artifact_ids(api, run_id)
                for key in ("detrl-verdict", "detrl-plot"):
                    if key in arts:
                        shots[f"{label}-{key.removeprefix('detrl-')}"] = f"{ui}/artifacts/artifact/{arts[key]}"
                for name, url in shots.items():
                    page.goto(url, wait_until="networkidle")
                    page.wait_for_timeout(2500)
                    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                    print(f"{out / (name + '.png')}: {url}")
            browser.close()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
