"""flashinfer's attention module, compiled while the downloads and the conversion run.

With an empty compile cache, an engine's first CUDA-graph capture waits for nvcc to build flashinfer's
batch-prefill module: the one flashinfer module a deterministic engine uses, since SGLang then decodes on
tensor cores, with the prefill kernels (benchmarks/results/*compile-cache*). The module depends only on
the dtypes and the model's head size, known once the model's config is on disk, so the flow starts its
build then, in a process of its own, into the compile cache the workers use. flashinfer holds a file
lock over a module's build and load: an engine that reaches the module mid-build waits for that build
instead of starting its own, and one that comes later finds it built.

When the module built here is not the one the engine asks for (a model whose attention this module does
not describe), the engine builds its own as it always did: a build ahead changes when a kernel is
compiled, never which kernel runs, and a kernel is the same code whether built now or loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..ray.env import runtime_env

# flashinfer's module arguments for a deterministic engine's attention: (backend, index dtype, positional
# encoding in the kernel, sliding window, logits soft-cap, fp16 QK reduction). SGLang applies RoPE before
# attention and plans the fa2 backend with int32 page indices.
BACKEND, INDEX_DTYPE, POS_ENCODING_NONE = "fa2", "int32", 0
DTYPES = ("bfloat16", "float16")  # flashinfer's attention has no float32 kernels
BUILD_TIMEOUT_S = 300.0  # a backstop (the flow waits for the build before it ends); an engine builds what this did not


@dataclass(frozen=True)
class Module:
    """The attention module an engine of this config asks flashinfer for."""

    dtype: str
    head_dim: int

    def argv(self) -> list[str]:
        return [sys.executable, "-m", __name__, "--dtype", self.dtype, "--head-dim", str(self.head_dim)]


@dataclass(frozen=True)
class Result:
    status: str  # built | found | skipped | failed
    detail: str
    seconds: float = 0.0

    def text(self) -> str:
        took = f" in {self.seconds:.1f} s" if self.status in ("built", "found", "failed") else ""
        return f"attention module ahead: {self.status}{took}: {self.detail}"


def module_for(cfg: RunConfig, model_dir: str | Path) -> Module | str:
    """The module the run's engines will build, or why none is built ahead."""
    sg = cfg.rollout.sglang
    if cfg.backends.rollout != "sglang" or not cfg.on_gpu:
        return "the run has no SGLang engine on a GPU"
    if cfg.resources.ray_address:
        return "the engines run on the Ray cluster's nodes, not on this host"
    if sg.attention_backend != "flashinfer":
        return f"the engines use attention_backend={sg.attention_backend}"
    if not cfg.determinism.enabled:
        return "without deterministic inference SGLang picks its decode kernels per model"
    if sg.dtype not in DTYPES:
        return f"flashinfer has no {sg.dtype} attention"
    try:
        model = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"the model's config.json is unreadable ({e})"
    heads, hidden = model.get("num_attention_heads"), model.get("hidden_size")
    head_dim = model.get("head_dim") or (hidden // heads if heads and hidden else None)
    if not isinstance(head_dim, int):
        return "the model's config gives no head size (num_attention_heads, hidden_size, head_dim)"
    # a window or a soft-cap is another module; which layers use one is the model's code, not its config
    windowed = model.get("sliding_window") and model.get("use_sliding_window", True)
    if windowed or any(kind != "full_attention" for kind in model.get("layer_types") or ()):
        return "the model has sliding-window layers"
    if model.get("attn_logit_softcapping"):
        return "the model soft-caps its attention logits"
    return Module(sg.dtype, head_dim)


def build(cfg: RunConfig, model_dir: str | Path, compile_cache: str, timeout_s: float = BUILD_TIMEOUT_S) -> Result:
    """Build the module into `compile_cache` (as the workers see it) and wait for the build. Never raises:
    a build that did not happen leaves the engine to build the module as it always does."""
    module = module_for(cfg, model_dir)
    if isinstance(module, str):
        return Result("skipped", module)
    # the rollout workers' environment: the same flashinfer workspace, CUDA and compiler settings
    env = {**os.environ, **runtime_env(cfg, "rollout", compile_cache)["env_vars"]}
    t = time.perf_counter()
    try:
        done = subprocess.run(module.argv(), env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result("failed", f"not built within {timeout_s:.0f} s; the engines build it", time.perf_counter() - t)
    took = time.perf_counter() - t
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return Result("failed", f"exit {done.returncode}: {' | '.join(tail)}; the engines build it", took)
    report = json.loads(lines[-1])
    status = "found" if report["compiled_before"] else "built"
    return Result(status, f"{report['name']} (head_dim {module.head_dim}, {module.dtype})", took)


def main(argv: list[str] | None = None) -> int:
    """`python -m detrl.rollout.attention_ahead`: build the module in this process's flashinfer workspace
    ($FLASHINFER_WORKSPACE_BASE) and print one JSON line: its name and whether it was compiled before."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=DTYPES, required=True)
    ap.add_argument("--head-dim", type=int, required=True)
    a = ap.parse_args(argv)
    import torch
    from flashinfer.jit.attention import gen_batch_prefill_module

    dtype, index = getattr(torch, a.dtype), getattr(torch, INDEX_DTYPE)
    # the engine's query, KV cache and output share the model's dtype (kv_cache_dtype=auto)
    spec = gen_batch_prefill_module(
        BACKEND, dtype, dtype, dtype, index, a.head_dim, a.head_dim, POS_ENCODING_NONE, False, False, False
    )
    before = spec.is_compiled
    spec.build_and_load()  # under flashinfer's lock for this module, as the engine takes it
    print(json.dumps({"name": spec.name, "compiled_before": before, "library": str(spec.get_library_path())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
