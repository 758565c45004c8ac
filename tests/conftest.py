"""Shared fixtures and helpers (no test module imports another). Two tiers:

pytest                                    # the unit tier: no Ray, no subprocess, no loop run
pytest -m integration                     # the integration tier: loop runs, the CLI, Prefect
bash scripts/test.sh                      # both tiers, lint and types (what CI runs)
pytest -m gpu                             # on a GPU host: the GPU tests
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest

# Nothing in the suite may reach the network: the hub clients fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
for key in ("NCCL_ALGO", "NVTE_ALLOW_NONDETERMINISTIC_ALGO", "CUBLAS_WORKSPACE_CONFIG"):
    os.environ.pop(key, None)  # workers must get them from det-rl's runtime_env, not from the shell
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detrl_cmd(*args: str) -> list[str]:
    """The CLI's command line, as `detrl` runs it (for a Popen the test watches)."""
    return [sys.executable, "-m", "detrl", *args]


def tiny_run(out, cache, *overrides: str) -> list[str]:
    """`run --profile tiny-cpu --out OUT --cache CACHE [--set KEY=VALUE ...]`: the CLI arguments most tests give."""
    sets = [a for kv in overrides for a in ("--set", kv)]
    return ["run", "--profile", "tiny-cpu", "--out", str(out), "--cache", str(cache), *sets]


def detrl(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: `python -m detrl ARGS` in a fresh process (`env`: extra variables)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(detrl_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# The integration tier: tests that run the loop through Ray (the `runs` and `ray_session` fixtures), are
# marked here; tests that start the CLI or Prefect in another process carry the mark themselves.
INTEGRATION_FIXTURES = {"runs", "ray_session"}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection sees the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run these on the GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("detrl-cache")


@pytest.fixture(scope="session")
def tiny_cfg():
    from detrl.config import load_config

    return load_config("tiny-cpu")


@pytest.fixture(scope="session")
def artifacts(tiny_cfg, cache_dir):
    from detrl.loop import prepare

    return prepare(tiny_cfg, cache_dir)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_cfg, artifacts, ray_session, worker_id):
    """Two tiny-cpu runs of the same config (a, and b scheduled as a twice-run's run B: its requests shuffled
    and split, detrl.schedule) in one directory; tests add their own beside them, each under its own name.
    Made once per test session: pytest-xdist's workers share it (the first makes it, the others wait)."""
    from filelock import FileLock

    from detrl.loop import run
    from detrl.schedule import for_run

    base = tmp_path_factory.getbasetemp()
    d = (base if worker_id == "master" else base.parent) / "shared-runs"
    with FileLock(f"{d}.lock"):
        if not (d / "made").exists():
            d.mkdir(exist_ok=True)
            run(tiny_cfg, d / "a", artifacts)
            run(tiny_cfg, d / "b", artifacts, schedule=for_run(tiny_cfg, "B"))
            (d / "made").touch()
    return d


# A synthetic tiny-cpu ledger (header, iterations, completion) for verifier tests by ledger surgery.
def hex_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ledger_records(n_iter: int = 2, **config_overrides) -> list[dict]:
    from detrl.config import load_config
    from detrl.ledger import LEDGER_VERSION, PHASES, combine

    cfg = load_config("tiny-cpu", overrides=[f"{k}={v}" for k, v in config_overrides.items()])
    header = {
        "kind": "header",
        "version": LEDGER_VERSION,
        "run_id": uuid.uuid4().hex,  # each call is another run
        "detrl": "0.1.0",
        "profile": "tiny-cpu",
        "config": cfg.recorded_dict(),
        "config_hash": cfg.config_hash(),
        "artifacts": {
            "model": {"sha256": hex_digest("model")},
            "data": {"sha256": hex_digest("data")},
            "megatron": {"hf_sha256": hex_digest("model")},
        },
        "engine": {"backend": "hf"},
        "selftest": {"passed": True},
        "prompts_available": 64,
        "prompts_dropped": 0,
        "fingerprints": {"driver": {"python": "3.11"}},
        "placement": {"trainer0": "node"},
        "started_at": "2026-11-24T00:00:00Z",
    }
    out = [header]
    for i in range(n_iter):
        tensors = {
            p: [[f"layer{k}.weight", f"xxh3_128:{hex_digest(f'{p}{i}{k}')[:32]}"] for k in range(3)]
            for p in ("policy_weights", "weights")
        }
        hashes = {p: hex_digest(f"{p}{i}") for p in PHASES}
        hashes.update({p: combine(dict(tensors[p])) for p in tensors})
        out.append(
            {
                "kind": "iteration",
                "iteration": i,
                "hashes": hashes,
                "tensors": tensors,
                "stats": {"loss": 0.5, "mean_reward": 0.25, "step_s": 1.0},
            }
        )
    out.append(
        {
            "kind": "complete",
            "iterations": n_iter,
            "final_weights": out[-1]["hashes"]["weights"],
            "wall_s": 3.5,
            "finished_at": "2026-11-24T00:01:00Z",
        }
    )
    return out


def write_ledger(d: Path, recs: list, raw_lines: list[str] | None = None) -> Path:
    from detrl.ledger import LEDGER_FILE

    d.mkdir(parents=True, exist_ok=True)
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in recs]
    (d / LEDGER_FILE).write_text("".join(line + "\n" for line in lines))
    return d
