"""Determinism settings of a worker process, the env every worker must see, and the environment
fingerprint recorded in every ledger."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import random
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DETERMINISM_ENV

# Packages whose versions change numerics (or which kernels run); recorded per worker.
TRACKED_PACKAGES = (
    "torch",
    "sglang",
    "sglang-kernel",
    "flashinfer-python",
    # sglang's pin; when importable on Hopper, SGLang's batch-invariant GEMMs run on it instead of a Triton
    # kernel. On an H200 both gave the same bits on SmolLM2's shapes (benchmarks/gemm_bits.py); other
    # shapes are not measured, so a verdict still names it when two hosts differ
    "sgl-deep-gemm",
    "megatron-core",
    "transformers",
    "tokenizers",
    "ray",
    "numpy",
    "triton",
    "transformer-engine",
    "flash-attn",
    "flash_attn_3",
    "safetensors",
    "det-rl",
)
# Module names of the standalone FlashAttention-3 package, which Megatron/Transformer Engine pick up
# when present; its backward is not deterministic in every version (slime/Miles: uninstall it).
FA3_MODULES = ("flash_attn_interface", "flash_attn_3", "flash_attn_3_cuda")


class DeterminismError(RuntimeError):
    """A worker cannot run deterministically as configured; the message says how to fix it."""


def apply_process_settings(enabled: bool, seed: int, threads: int | None = None) -> None:
    """Seed every RNG and switch PyTorch's deterministic mode on or off for this process. Off is
    production mode: the RNGs are seeded from OS entropy, as nothing pins them in production."""
    if threads:
        torch.set_num_threads(threads)
    if not enabled:
        seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def read_env(keys: Any = DETERMINISM_ENV) -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in keys}


def env_problems(seen: Mapping[str, str | None], required: Mapping[str, str], where: str) -> list[str]:
    out = []
    for k, want in required.items():
        got = seen.get(k)
        if got is None:
            out.append(f"{where}: {k} is not set (needs {k}={want})")
        elif got != want:
            out.append(f"{where}: {k}={got} (needs {k}={want})")
    return out


def fa3_importable() -> str | None:
    for name in FA3_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def sgl_kernel_fa3() -> bool:
    """Whether sgl-kernel carries its FA3 kernels (used by SGLang only with attention_backend=fa3)."""
    try:
        spec = importlib.util.find_spec("sgl_kernel")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(Path(d).glob("flash_ops*.so") for d in spec.submodule_search_locations)


def te_importable() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in TRACKED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["torch"] = torch.__version__  # the running one, whatever the metadata says
    return out


def _gpu() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"count": 0}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        pass
    nccl = None
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
    return {
        "count": len(names),
        "names": names,
        "capability": f"{props.major}.{props.minor}",
        "driver": driver,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": nccl,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def fingerprint(role: str = "driver", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What this process runs on; compared between runs to name the likely cause of a mismatch.
    The host name is hashed; no other identifying data is taken."""
    fp: dict[str, Any] = {
        "role": role,
        "host": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "gpu": _gpu(),
        "fa3": fa3_importable(),
        "sgl_kernel_fa3": sgl_kernel_fa3(),
        "transformer_engine": te_importable(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": read_env(),
    }
    if extra:
        fp.update(extra)
    return fp
