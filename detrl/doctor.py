"""Preflight: can this configuration run deterministically here? Checks on the driver and inside every
worker (same Ray runtime env and resources as the real run, no model loaded), each with its fix."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import twice
from .config import ConfigError, RunConfig
from .determinism import fa3_importable, read_env
from .models import check_source


@dataclass
class Check:
    where: str
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def table(self) -> str:
        rows = [("where", "check", "result", "detail / fix")]
        for c in self.checks:
            rows.append(
                (c.where, c.name, "pass" if c.ok else "FAIL", c.detail + (f" -> {c.fix}" if c.fix and not c.ok else ""))
            )
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows)

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.checks]


def check_resources(cfg: RunConfig) -> None:
    """Fail early, before any download or conversion, when a local run cannot get its GPUs or its
    model source is unusable (a GGUF that is missing or of an unsupported kind), or its reward cannot run."""
    from . import rewards

    check_source(cfg.model)
    rewards.check(cfg.reward)
    if not cfg.on_gpu or cfg.resources.ray_address:
        return
    have = twice.local_gpus()
    twice.choose(cfg, have)  # side_by_side without GPUs for both runs fails here, before any work
    if have < cfg.resources.num_gpus:
        raise ConfigError(
            f"profile {cfg.profile!r} needs {cfg.resources.num_gpus} GPU(s) but this machine has {have}. "
            "Use --profile tiny-cpu (or the flow's profile=auto), or set resources.ray_address to a Ray "
            "cluster with GPUs"
        )
    if cfg.backends.rollout == "sglang" and importlib.util.find_spec("sglang") is None:
        raise ConfigError(
            "backends.rollout=sglang but SGLang is not installed here "
            "(pip install 'det-rl[gpu]', or use the docker/ image)"
        )


def driver_checks(cfg: RunConfig) -> list[Check]:
    out = []
    try:
        check_resources(cfg)
        out.append(Check("driver", "resources", True, f"{cfg.resources.num_gpus} GPU(s) requested"))
    except ConfigError as exc:
        out.append(Check("driver", "resources", False, str(exc), "use a CPU profile or a machine/cluster with GPUs"))
    out.append(
        Check(
            "driver",
            "determinism",
            cfg.determinism.enabled,
            "on" if cfg.determinism.enabled else "off (production mode: runs are expected to differ)",
            "set determinism.enabled=true",
        )
    )
    return out


def worker_checks(role: str, cfg: RunConfig) -> list[Check]:
    """Run inside a worker process."""
    out = _determinism_checks(role, cfg) if cfg.determinism.enabled else []
    if cfg.on_gpu:
        n = twice.local_gpus()
        out.append(
            Check(
                role,
                "GPU visible",
                n > 0,
                f"{n} visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})",
                "check the Ray GPU resources of the node",
            )
        )
    if role.startswith("trainer") and cfg.resources.trainer_ranks > 1 and cfg.determinism.enabled:
        algo = os.environ.get("NCCL_ALGO")
        out.append(
            Check(
                role,
                "NCCL ring all-reduce",
                algo == "Ring",
                f"NCCL_ALGO={algo}",
                "NCCL_ALGO=Ring on every rank: other algorithms sum in a topology-dependent order",
            )
        )
    return out


def _determinism_checks(role: str, cfg: RunConfig, env: Mapping[str, str | None] | None = None) -> list[Check]:
    """`env`: the environment the worker will have (the driver's prediction), else this process's."""
    from .ray.env import ENV_CHECK, FA3_CHECK, determinism_problems

    seen = read_env(cfg.determinism.env) if env is None else {k: env.get(k) for k in cfg.determinism.env}
    fa3 = fa3_importable()
    found = determinism_problems(role, seen, fa3, cfg)
    out = []
    for name, passed in (
        (ENV_CHECK, ", ".join(f"{k}={v}" for k, v in cfg.determinism.env.items())),
        (FA3_CHECK, "not importable"),
    ):
        mine = [p for p in found if p.check == name]
        out.append(
            Check(role, name, not mine, "; ".join(p.detail for p in mine) or passed, mine[0].fix if mine else "")
        )
    if env is not None:  # a prediction from the driver: the worker itself runs nothing here
        if role == "rollout":
            out.append(_engine_check(cfg))
        return out
    try:
        dev = "cuda" if cfg.on_gpu and torch.cuda.is_available() else "cpu"
        torch.use_deterministic_algorithms(True)
        x = torch.randn(64, 64, device=dev, requires_grad=True)
        idx = torch.arange(32, device=dev) % 7
        (x @ x)[idx].sum().backward()  # matmul (cuBLAS workspace) and indexing backward
        out.append(Check(role, "deterministic algorithms", True, f"enabled and exercised on {dev}"))
    except Exception as exc:
        out.append(
            Check(
                role,
                "deterministic algorithms",
                False,
                f"{type(exc).__name__}: {str(exc)[:200]}",
                "set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the worker env",
            )
        )
    if role == "rollout":
        out.append(_engine_check(cfg))
    return out


def _engine_check(cfg: RunConfig) -> Check:
    if cfg.backends.rollout == "hf":
        ok = cfg.rollout.hf.batching == "per_sequence"
        return Check(
            "rollout",
            "engine can be batch-invariant",
            ok,
            f"hf engine, batching={cfg.rollout.hf.batching}",
            "set rollout.hf.batching=per_sequence",
        )
    backend = cfg.rollout.sglang.attention_backend
    if importlib.util.find_spec("sglang") is None:
        return Check(
            "rollout",
            "engine can be batch-invariant",
            False,
            "SGLang is not installed in this worker",
            "pip install 'det-rl[gpu]' or use the docker/ image",
        )
    return Check(
        "rollout",
        "engine can be batch-invariant",
        backend in ("flashinfer", "triton"),
        f"sglang, attention_backend={backend}, enable_deterministic_inference",
        "use rollout.sglang.attention_backend=flashinfer (or triton)",
    )


def run(cfg: RunConfig, in_workers: bool = True) -> Report:
    """Driver checks, then the same checks inside each worker the run would start (`in_workers`), or,
    without starting any, against the environment a local Ray's workers will have: this process's under
    the runtime env (`detrl.ray.env.predicted_env`). The flow's preflight takes the second way on a local
    run, starting nothing, since each run reads its workers' environment back before any model is
    loaded anyway; on a cluster it starts the workers, whose nodes the driver cannot see."""
    checks = driver_checks(cfg)
    if not checks[0].ok:
        return Report(checks)
    if not in_workers and not cfg.resources.ray_address:
        from .ray.env import predicted_env

        for role in ("trainer", "rollout"):
            checks += _determinism_checks(role, cfg, predicted_env(cfg, role)) if cfg.determinism.enabled else []
        return Report(checks)
    from .ray.group import Workers  # Ray takes seconds to import: keep `check_resources` instant

    with Workers(cfg, model_dir="", ckpt_dir="", setup=False) as w:
        checks += [Check(**c) for c in w.check(worker_checks)]
    return Report(checks)
