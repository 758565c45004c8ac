"""End to end as users run it: a real `prefect server start` on 127.0.0.1 with a temporary
PREFECT_HOME, the process work pool, `prefect deploy` from deployments/prefect.yaml, a worker, and
`prefect deployment run det-rl/gsm8k`; state and artifacts are read back through the Prefect API.
Only the processes this module starts are stopped."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import free_port
from crash import kill_trainer_when

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = pytest.mark.integration


class Receiver:
    """A real HTTP endpoint on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self):
        self.messages: list[dict] = []
        received = self.messages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, match, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [m for m in self.messages if match(m)]
            if found:
                return found[-1]
            time.sleep(0.5)
        raise AssertionError(f"no matching notification in {timeout} s; received: {self.messages}")

    def poll(self):
        return 0

    def stop(self):
        self.server.shutdown()


def _stop(proc) -> None:
    if isinstance(proc, Receiver):
        proc.stop()
        return
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "storage"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        "DETRL_CACHE": str(tmp / "cache"),
        "DETRL_RUNS": str(tmp / "runs"),
        "DETRL_GOLDEN": str(tmp / "golden"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    procs = []
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(tmp / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs.append(server)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "prefect server did not come up in 180 s"
            time.sleep(1)
        run = lambda *a: subprocess.run([*PREFECT, *a], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        r = run("work-pool", "create", "detrl-process", "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "gsm8k")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        receiver = Receiver()
        procs.append(receiver)
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from prefect.blocks.notifications import "
                "CustomWebhookNotificationBlock as B; B(name='ops', url=" + repr(receiver.url) + ", json_data="
                "{'text': '{{body}}', 'subject': '{{subject}}'}).save('ops')",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", "detrl-process"],
            env=env,
            cwd=ROOT,
            stdout=open(tmp / "worker.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(worker)
        yield {"env": env, "api": api, "run": run, "tmp": tmp, "receiver": receiver, "block": "custom-webhook/ops"}
    finally:
        for p in reversed(procs):
            _stop(p)


def _deployment_run(ctx, *params: str) -> str:
    args = ["deployment", "run", "det-rl/gsm8k"]
    for p in params:
        args += ["--param", p]
    r = ctx["run"](*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1)


def _wait(ctx, run_id: str, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = httpx.get(f"{ctx['api']}/flow_runs/{run_id}", timeout=10).json()
        if fr["state"]["type"] in TERMINAL:
            return fr
        time.sleep(3)
    log = (ctx["tmp"] / "worker.log").read_text()[-4000:]
    raise AssertionError(f"flow run {run_id} not finished in {timeout} s; worker log:\n{log}")


def _running_name(ctx, run_id: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = httpx.get(f"{ctx['api']}/flow_runs/{run_id}", timeout=10).json()
        if fr["state"]["type"] != "SCHEDULED" and fr["state"]["name"] != "Pending" and "-seed" in fr["name"]:
            return fr["name"]
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} did not start in {timeout} s")


def _artifacts(ctx, run_id: str) -> dict:
    res = httpx.post(
        f"{ctx['api']}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 100},
        timeout=10,
    )
    res.raise_for_status()
    return {a["key"]: a for a in res.json() if a.get("key")}


def test_deployment_is_registered_with_its_nightly_schedule(prefect_env):
    dep = httpx.get(f"{prefect_env['api']}/deployments/name/det-rl/gsm8k", timeout=10).json()
    assert dep["work_pool_name"] == "detrl-process"
    assert dep["parameters"]["profile"] == "gsm8k-qwen2.5-0.5b"
    crons = [s["schedule"]["cron"] for s in dep["schedules"]]
    assert crons == ["0 3 * * *"] and dep["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert dep["global_concurrency_limit"]["limit"] == 1  # `concurrency_limit` is the deprecated, always-None field
    props = dep["parameter_openapi_schema"]["properties"]  # the UI form
    assert "profile" in props and "webhook URL" in props["notify"]["description"]
    assert all(props[p].get("description") for p in props), [p for p in props if not props[p].get("description")]
    assert dep["tags"] == ["det-rl", "reproducibility", "nightly"] and dep["version"] == "0.1.0"


def test_deployment_run_survives_a_worker_crash_and_completes_with_its_verdict(prefect_env):
    """The nightly path end to end: a trainer is SIGKILLed mid run A, Prefect retries the task, the run
    resumes from its checkpoint, and the verdict is still IDENTICAL with every artifact in place."""
    run_id = _deployment_run(
        prefect_env,
        "profile=tiny-cpu",
        "steps=2",
        'overrides=["checkpoint.every=1"]',
        f"notify={prefect_env['block']}",
        "notify_on_success=true",
    )
    name = _running_name(prefect_env, run_id)  # the flow names its run when it starts (profile, seed, time)
    assert re.fullmatch(r"tiny-cpu-seeddefault-\d{4}-\d{6}", name), name
    # in the last iteration, once the first one's checkpoint is saved (two iterations: CI time)
    killed = kill_trainer_when(
        prefect_env["tmp"] / "runs", f"*-{name}/run_a/ledger.jsonl", iterations=1, checkpointed=True
    )
    fr = _wait(prefect_env, run_id)
    assert killed, "the trainer was never killed"
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    tasks = httpx.post(
        f"{prefect_env['api']}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 50},
        timeout=10,
    ).json()
    attempts = {t["name"]: t["run_count"] for t in tasks}
    assert attempts["run-loop-A"] == 2 and attempts["run-loop-B"] == 1, attempts
    # the flow builds the engines' attention module beside the conversion (a CPU run has none to build)
    assert [t["state"]["type"] for t in tasks if t["name"].startswith("build-attention-module")] == ["COMPLETED"]
    run_a = next((prefect_env["tmp"] / "runs").glob(f"*-{name}/run_a"))
    assert json.loads((run_a / "resumes.jsonl").read_text().splitlines()[0])["from_checkpoint"] >= 0

    arts = _artifacts(prefect_env, run_id)
    assert {
        "detrl-verdict",
        "detrl-phases",
        "detrl-curves",
        "detrl-plot",
        "detrl-progress-a",
        "detrl-progress-b",
        "detrl-preflight",
    } <= set(arts)
    assert "IDENTICAL" in arts["detrl-verdict"]["data"]
    phases = (
        json.loads(arts["detrl-phases"]["data"])
        if isinstance(arts["detrl-phases"]["data"], str)
        else arts["detrl-phases"]["data"]
    )
    assert len(phases) == 2 and all(v == "match" for row in phases for k, v in row.items() if k != "iteration")
    curves = (
        json.loads(arts["detrl-curves"]["data"])
        if isinstance(arts["detrl-curves"]["data"], str)
        else arts["detrl-curves"]["data"]
    )
    assert len(curves) == 4 and {
        "response_len_min",
        "response_len_median",
        "response_len_max",
        "eos_fraction",
        "nonzero_reward_fraction",
        "logprob_max_abs_diff",
    } <= set(curves[0])
    assert "## Rollout shape" in arts["detrl-verdict"]["data"]
    verdict = arts["detrl-verdict"]["data"]
    assert f"- run A: `{(run_a / 'ledger.jsonl').resolve()}`" in verdict and "file://" not in verdict
    assert "![reward, loss, length, logprob diff](data:image/png;base64," in verdict
    assert arts["detrl-plot"]["type"] == "image" and arts["detrl-plot"]["data"].startswith("data:image/png;base64,")
    assert float(arts["detrl-progress-b"]["data"]) == 100.0
    assert (prefect_env["tmp"] / "golden").is_dir()  # the first completed run is recorded as known-good
    # notify_on_success through the Prefect notification block (a custom webhook to the local receiver)
    sent = prefect_env["receiver"].wait_for(lambda m: name in m.get("text", ""))
    assert f"det-rl {name}: Completed" in sent["text"], sent


def test_a_planted_divergence_fails_the_run_is_named_and_alerts_the_webhook(prefect_env):
    tensor = "decoder.layers.1.mlp.linear_fc2.weight"
    hook = prefect_env["receiver"].url
    run_id = _deployment_run(
        prefect_env,
        "profile=tiny-cpu",
        "steps=2",
        f'plant=["1:{tensor}"]',
        f"notify={hook}",
        'overrides=["resources.twice=side_by_side"]',
    )
    fr = _wait(prefect_env, run_id)
    assert fr["state"]["type"] == "FAILED", fr["state"]
    assert "diverged at iteration 1, policy_weights" in fr["state"]["message"]
    # side by side: run B started before run A ended
    tasks = httpx.post(
        f"{prefect_env['api']}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 50},
        timeout=10,
    ).json()
    loops = {t["name"]: t for t in tasks if t["name"].startswith("run-loop-")}
    assert loops["run-loop-B"]["start_time"] < loops["run-loop-A"]["end_time"], loops
    arts = _artifacts(prefect_env, run_id)
    verdict = arts["detrl-verdict"]["data"]
    assert "DIVERGED" in verdict and "model.layers.1.mlp.down_proj.weight" in verdict
    # the artifact stands alone: decoded tokens of A and B at the first differing log-prob, the plot
    assert "rollout_logprobs first differ at sample" in verdict and "run B tokens" in verdict
    assert "data:image/png;base64," in verdict and arts["detrl-plot"]["type"] == "image"
    msg = prefect_env["receiver"].wait_for(lambda m: m.get("flow_run") == fr["name"])
    assert msg["state"] == "Failed" and msg["verdict"] == "diverged"
    assert msg["first_divergence"].startswith("iteration 1, policy_weights: 1 of 26 tensors differ")
    assert "model.layers.1.mlp.down_proj.weight" in msg["likely_cause"]
    assert msg["ui_url"].endswith(f"/runs/flow-run/{run_id}"), msg["ui_url"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the reference profile is valid here")
def test_the_reference_profile_on_a_cpu_machine_fails_first_with_the_fix(prefect_env):
    run_id = _deployment_run(prefect_env)  # the deployment's own parameters: the GPU reference run
    fr = _wait(prefect_env, run_id, timeout=300)
    assert fr["state"]["type"] == "FAILED"
    runs = httpx.post(
        f"{prefect_env['api']}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 50},
        timeout=10,
    ).json()
    assert [t["name"].rsplit("-", 1)[0] for t in runs] == ["resolve-config"]  # nothing ran after it
    assert "needs 1 GPU(s)" in fr["state"]["message"] or "needs 1 GPU(s)" in json.dumps(runs)


def _script(code: str, tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python with no Prefect server or API settings of this process's, its own PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_SERVER_", "PREFECT_API_"))}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("given", [None, "7"])
def test_the_flows_temporary_server_has_time_to_start_on_a_fresh_host_and_sends_no_telemetry(given, tmp_path):
    # Prefect's own default (20 s) is shorter than a fresh host's first start of the server, which creates
    # and migrates its database: the flow would fail before its first task. A user's setting wins.
    code = (
        "import flows.detrl_flow\n"
        "from prefect.settings import get_current_settings\n"
        "s = get_current_settings().server\n"
        "print(s.ephemeral.startup_timeout_seconds, s.analytics_enabled)\n"
    )
    out = _script(code, tmp_path, **({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": given} if given else {}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [given or "180", "False"]


def test_a_local_run_starts_the_temporary_server_ahead_and_its_flow_uses_that_server(tmp_path):
    # flows.server.start_ahead returns at once and the server answers after wait(); the flow's client then
    # takes that server (Prefect keeps one per process), so no second one starts
    code = (
        "import time\n"
        "from flows.server import start_ahead\n"
        "t = time.perf_counter(); wait = start_ahead(); back = time.perf_counter() - t\n"
        "import httpx\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "server = SubprocessASGIServer()\n"
        "t = time.perf_counter(); wait(); waited = time.perf_counter() - t\n"
        "status = httpx.get(server.api_url + '/health').status_code\n"
        "from prefect import flow, get_client\n"
        "@flow\n"
        "def f():\n"
        "    with get_client(sync_client=True) as c:\n"
        "        return str(c.api_url)\n"
        "url = f()\n"
        "print(back < waited, status, url.rstrip('/') == server.api_url, len(SubprocessASGIServer._instances))\n"
    )
    out = _script(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["True", "200", "True", "1"]


def test_the_server_started_ahead_reports_a_failed_start_at_the_wait_and_none_starts_for_a_real_server(tmp_path):
    failing = "from flows.server import start_ahead\nwait = start_ahead()\nwait()\n"
    out = _script(failing, tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert out.returncode == 1 and "Timed out while attempting to connect" in out.stderr
    # with a server of the user's (a deployment's worker), nothing starts: wait() returns at once
    code = (
        "from flows.server import start_ahead\n"
        "start_ahead()()\n"
        "import sys\n"
        "print('prefect.server.api.server' in sys.modules)\n"
    )
    out = _script(code, tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False"]
