"""What every worker process sees, and the one check that it is fit to run deterministically.

`runtime_env` is the one place that decides a worker's environment (verl's shape: one function owns the
Ray runtime env). `determinism_problems` is the one rule for the determinism variables and
FlashAttention-3: the run's workers refuse to start on any problem it names, and `doctor` shows it as
rows of its report."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..determinism import DeterminismError, env_problems

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent.parent)
# The JIT caches a worker fills (Triton kernels, torch inductor, flashinfer's compiled ops, DeepGEMM's
# kernels, which SGLang's deterministic GEMMs build per shape on Hopper, and tvm-ffi's torch DLPack addon,
# which flashinfer's import builds where torch lacks its C exchange API), kept under the det-rl cache so
# run B, the next nightly and the Docker volume start warm. SGLang overwrites DG_JIT_CACHE_DIR with
# SGLANG_DG_CACHE_DIR (default ~/.cache/deep_gemm): both are set, and a user moves it with the latter.
# A compiled kernel is the same code whether built now or loaded: a warm cache changes no bit (cold and
# warm ledgers are compared in benchmarks/results).
COMPILE_CACHE_ENV = {
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
    "SGLANG_DG_CACHE_DIR": "deep_gemm",
    "DG_JIT_CACHE_DIR": "deep_gemm",
    "TVM_FFI_CACHE_DIR": "tvm-ffi",
}
# Inherited from the driver when set: offline switches, the host's NVLink-multicast guards (they must
# reach every process that opens NCCL), and a user's own compile caches (all but DG_JIT_CACHE_DIR, which
# SGLang sets from SGLANG_DG_CACHE_DIR).
PASSTHROUGH_ENV = (
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
    "NCCL_DEBUG",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    *(key for key in COMPILE_CACHE_ENV if key != "DG_JIT_CACHE_DIR"),
)
ENV_CHECK, FA3_CHECK = "determinism env", "FlashAttention-3 absent"


def runtime_env(cfg: RunConfig, role: str, compile_cache: str | None = None) -> dict[str, Any]:
    env: dict[str, str] = {
        "PYTHONHASHSEED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(cfg.resources.cpu_threads),
    }
    if cfg.determinism.enabled:
        env.update(cfg.determinism.env)
    if cfg.on_gpu and role == "trainer":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # fewer fragments beside SGLang
    if cfg.on_gpu and role == "trainer" and cfg.resources.tensor_parallel > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron: TP's async all-reduce is queued before the wgrad GEMM
    if compile_cache:
        env.update({key: str(Path(compile_cache) / sub) for key, sub in COMPILE_CACHE_ENV.items()})
    for key in PASSTHROUGH_ENV:  # the user's own settings win over ours
        value = users_own(key)
        if value is not None:
            env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    for key, value in cfg.resources.worker_env.get(role, {}).items():  # type: ignore[call-overload]
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return {"env_vars": env}


def users_own(key: str) -> str | None:
    """This process's value of `key`, unless it is one a library set for itself: torch's inductor writes its
    default cache folder into TORCHINDUCTOR_CACHE_DIR the first time it looks for it (importing
    torch._dynamo does, and the driver imports it with transformers and Megatron). Passed through as a
    user's setting, that default took every worker out of det-rl's cache. A user who chose that very
    folder gets det-rl's instead (a kernel is the same code from either)."""
    value = os.environ.get(key)
    if key == "TORCHINDUCTOR_CACHE_DIR" and value is not None:
        inductor = sys.modules.get("torch._inductor.runtime.cache_dir_utils")  # not imported: torch set nothing
        if inductor is not None and value == inductor.default_cache_dir():
            return None
    return value


def predicted_env(cfg: RunConfig, role: str) -> dict[str, str]:
    """What a worker of `role` started by a local Ray sees: this process's environment, which Ray's
    workers inherit, under the runtime env's variables."""
    return {**os.environ, **runtime_env(cfg, role)["env_vars"]}


@dataclass(frozen=True)
class Problem:
    role: str
    check: str  # ENV_CHECK or FA3_CHECK
    detail: str
    fix: str


def determinism_problems(role: str, env: Mapping[str, str | None], fa3: str | None, cfg: RunConfig) -> list[Problem]:
    """The determinism variables a process of `role` lacks, and FA3 if it can import it. Nothing when
    determinism is off."""
    if not cfg.determinism.enabled:
        return []
    out = [
        Problem(
            role,
            ENV_CHECK,
            p,
            "det-rl passes these through the Ray runtime_env: remove the resources.worker_env entry that drops "
            "it; on a cluster, export it on every node",
        )
        for p in env_problems(env, cfg.determinism.env, role)
    ]
    if fa3:
        out.append(
            Problem(
                role,
                FA3_CHECK,
                f"{role}: FlashAttention-3 is importable ({fa3})",
                "pip uninstall -y flash_attn_3 (Megatron/TE would use its non-deterministic kernels)",
            )
        )
    return out


def refuse(problems: list[Problem]) -> None:
    """Raise DeterminismError naming every problem and its fix."""
    if problems:
        raise DeterminismError(
            "determinism is on but the workers are not fit to run deterministically:\n  "
            + "\n  ".join(f"{p.detail} -> {p.fix}" for p in problems)
        )
