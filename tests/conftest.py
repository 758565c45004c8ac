"""Shared fixtures and helpers (no test module imports another). Two tiers:

pytest                                    # the unit tier: no Ray, no subprocess, no loop run
pytest -m integration                     # the integration tier: loop runs, the CLI, Prefect
bash scripts/test.sh                      # both tiers, lint and types (what CI runs)
pytest -m gpu                             # on a GPU host: the GPU tests
"""

import os
import socket
import subprocess
import sys
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
def runs(tmp_path_factory, tiny_cfg, artifacts, ray_session):
    """Two tiny-cpu runs of the same config (a, and b scheduled as a twice-run's run B: its requests shuffled
    and split, detrl.schedule) in one directory; tests add their own beside them."""
    from detrl.loop import run
    from detrl.schedule import for_run

    d = tmp_path_factory.mktemp("runs")
    run(tiny_cfg, d / "a", artifacts)
    run(tiny_cfg, d / "b", artifacts, schedule=for_run(tiny_cfg, "B"))
    return d
