"""The kernels an engine compiles at its first CUDA-graph capture, compiled while the downloads and the
conversion run: flashinfer's attention module and SGLang's store_cache kernel.

With an empty compile cache, an engine's first CUDA-graph capture waits for nvcc to build flashinfer's
batch-prefill module: the one flashinfer module a deterministic engine uses, since SGLang then decodes on
tensor cores, with the prefill kernels (benchmarks/results/*compile-cache*). The module depends only on
the dtypes and the model's head size, known once the model's config is on disk, so the flow starts its
build then, in a process of its own, into the compile cache the workers use. flashinfer holds a file
lock over a module's build and load: an engine that reaches the module mid-build waits for that build
instead of starting its own, and one that comes later finds it built.

The same capture also waits for SGLang's store_cache kernel (`sglang.kernels.ops.kvcache`), which writes
each layer's keys and values into the KV cache: tvm-ffi compiles it with nvcc on first use, per row width
of the cache, under a file lock in its cache ($TVM_FFI_CACHE_DIR), and an engine loads a built one
without compiling (the H100 profile in benchmarks/results/*profile-splits* shows one engine compiling it
during its first capture while the other waits on the lock). Its row width is the model's key-value heads
times the head size times the cache's element size, also known from the config, so it is built beside
the attention module, in a process of its own, by SGLang's own call.

When a kernel built here is not the one the engine asks for (a model whose attention this module does
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

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
class StoreCache:
    """SGLang's store_cache kernel for this config's KV cache: bytes per token of a layer's keys and values."""

    row_bytes: int
    v_row_bytes: int

    def argv(self) -> list[str]:
        return [sys.executable, "-m", __name__, "--store-cache", str(self.row_bytes), str(self.v_row_bytes)]

    def built(self, env: Mapping[str, str]) -> list[str]:
        """The modules of this row width in the tvm-ffi cache that `env` names. SGLang names a module by its
        arguments and a hash of its source, and loads one so named without compiling."""
        cache = Path(env.get("TVM_FFI_CACHE_DIR", "~/.cache/tvm-ffi")).expanduser()
        return sorted(p.stem for p in cache.glob(f"**/sgl_kernel_jit_kvcache_{self.row_bytes}_{self.v_row_bytes}_*.so"))


@dataclass(frozen=True)
class Result:
    status: str  # built | found | skipped | failed
    detail: str
    seconds: float = 0.0
    what: str = "attention module"

    def text(self) -> str:
        took = f" in {self.seconds:.1f} s" if self.status in ("built", "found", "failed") else ""
        return f"{self.what} ahead: {self.status}{took}: {self.detail}"


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


def store_cache_for(cfg: RunConfig, model_dir: str | Path, module: Module | str | None = None) -> StoreCache | str:
    """The store_cache kernel the run's engines will build, or why none is built ahead. Every condition of
    the attention module holds here too: the same engines, and a model whose layers share one KV layout
    (`module`: `module_for`'s answer, when the caller has it already)."""
    module = module_for(cfg, model_dir) if module is None else module
    if isinstance(module, str):
        return module
    model = json.loads((Path(model_dir) / "config.json").read_text())
    kv_heads = model.get("num_key_value_heads") or model.get("num_attention_heads")
    if not isinstance(kv_heads, int):
        return "the model's config gives no key-value head count"
    # one engine on one GPU (SGLang's tp_size 1, which det-rl leaves as it is); the cache in the model's
    # dtype (kv_cache_dtype auto), 2 bytes an element in both dtypes flashinfer serves
    row = kv_heads * module.head_dim * 2
    return StoreCache(row, row)


def build(
    cfg: RunConfig, model_dir: str | Path, compile_cache: str, timeout_s: float = BUILD_TIMEOUT_S
) -> list[Result]:
    """Build both kernels into `compile_cache` (as the workers see it), each in a process of its own, at
    once, and wait for both. Never raises: a build that did not happen leaves the engine to build it as it
    always does."""
    module = module_for(cfg, model_dir)
    kernels: list[Module | StoreCache | str] = [module, store_cache_for(cfg, model_dir, module)]
    # the rollout workers' environment: the same caches, CUDA and compiler settings
    env = {**os.environ, **runtime_env(cfg, "rollout", compile_cache)["env_vars"]}
    t = time.perf_counter()
    whats = ("attention module", "store_cache kernel")
    known: dict[int, Result] = {}
    store = kernels[1]
    if isinstance(store, StoreCache) and (names := store.built(env)):
        # found without a process: asking SGLang would cost an import of SGLang beside the runs' own. A
        # module of another SGLang's source (another hash) is taken too, and the engine builds its own, once
        known[1] = Result("found", f"{names[0]} (rows of {store.row_bytes} bytes)", time.perf_counter() - t, whats[1])
    procs = [
        None
        if isinstance(k, str) or i in known
        else subprocess.Popen(k.argv(), env=env, stdout=PIPE, stderr=PIPE, text=True)
        for i, k in enumerate(kernels)
    ]
    return [
        known.get(i) or _result(w, k, p, t + timeout_s, t)
        for i, (w, k, p) in enumerate(zip(whats, kernels, procs, strict=True))
    ]


def _result(
    what: str, kernel: Module | StoreCache | str, proc: subprocess.Popen | None, deadline: float, t: float
) -> Result:
    if isinstance(kernel, str) or proc is None:
        return Result("skipped", str(kernel), what=what)
    try:
        out, err = proc.communicate(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        limit = deadline - t
        return Result("failed", f"not built within {limit:.0f} s; the engines build it", time.perf_counter() - t, what)
    took = time.perf_counter() - t
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-3:]
        return Result("failed", f"exit {proc.returncode}: {' | '.join(tail)}; the engines build it", took, what)
    report = json.loads(lines[-1])
    status = "found" if report["compiled_before"] else "built"
    if isinstance(kernel, Module):
        return Result(status, f"{report['name']} (head_dim {kernel.head_dim}, {kernel.dtype})", took, what)
    return Result(status, f"{report['name']} (rows of {kernel.row_bytes} bytes)", took, what)


def main(argv: list[str] | None = None) -> int:
    """`python -m detrl.rollout.attention_ahead`: build the attention module in this process's flashinfer
    workspace ($FLASHINFER_WORKSPACE_BASE), or with `--store-cache` SGLang's store_cache kernel in its tvm-ffi
    cache ($TVM_FFI_CACHE_DIR), and print one JSON line: its name and whether it was compiled before."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=DTYPES)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--store-cache", type=int, nargs=2, metavar=("ROW_BYTES", "V_ROW_BYTES"))
    a = ap.parse_args(argv)
    if a.store_cache:
        return _store_cache(*a.store_cache)
    if a.dtype is None or a.head_dim is None:
        ap.error("give --dtype and --head-dim (the attention module) or --store-cache ROW_BYTES V_ROW_BYTES")
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


def _store_cache(row_bytes: int, v_row_bytes: int) -> int:
    # SGLang's own call, as its KV pool makes it before the first write: the same arguments, so the same
    # module name and build directory, under tvm-ffi's lock for that directory
    from sglang.kernels.ops.kvcache.kvcache import can_use_store_cache

    kernel = StoreCache(row_bytes, v_row_bytes)
    before = bool(kernel.built(os.environ))
    if not can_use_store_cache(row_bytes, v_row_bytes):  # SGLang logged why
        print(
            f"SGLang cannot build its store_cache kernel for rows of {row_bytes}/{v_row_bytes} bytes", file=sys.stderr
        )
        return 1
    built = kernel.built(os.environ)
    print(json.dumps({"name": built[0] if built else f"kvcache {row_bytes}/{v_row_bytes}", "compiled_before": before}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
