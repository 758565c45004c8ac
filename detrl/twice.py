"""How runs A and B are scheduled: one after the other, side by side each on its own GPUs, or side by
side sharing one GPU (`shared_gpu`: half of it each, the engines' KV caches sized to one step's batch).
Each run has its own workers every way; only the wall time changes (the ledgers are compared with a
sequential pair in the tests and on the GPU, benchmarks/results/)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from .config import ConfigError, RunConfig
from .megatron.names import ArchMeta
from .rollout import step_kv_tokens

T = TypeVar("T")
SHARED_GPU_SHARE = 0.5
GIB = 1 << 30


def local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_memory_gib() -> float:
    return torch.cuda.get_device_properties(0).total_memory / GIB if local_gpus() else 0.0


def _params(m: ArchMeta) -> int:
    return m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2) + m.num_layers * m.params_per_layer


def host_memory_gib() -> float:
    """Memory a new process can take now without swapping (the kernel's MemAvailable)."""
    import psutil

    return psutil.virtual_memory().available / GIB


def cpu_run_memory_gib(cfg: RunConfig, model_dir: str | Path) -> float:
    """An estimate of one CPU run's peak host memory: each worker process's imports (torch,
    Megatron, transformers); the trainer's fp32 weights, gradients and Adam state plus the copy it exports
    for the weight sync (20 bytes a parameter); the engine's fp32 weights, the copy it receives and its
    generation's working memory (20 bytes a parameter); and the fp32 logits of the largest micro-batch
    (two copies). Its constants were set against the processes' resident-set peaks of the smollm2-cpu
    pair (benchmarks/results/README.md, CPU records)."""
    m = ArchMeta.from_hf_dir(model_dir)
    t = cfg.train
    tokens = t.micro_batch_tokens or t.micro_batch_size * (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    processes = cfg.resources.trainer_ranks + 1
    return processes * 1.0 + (40 * _params(m) + 8 * tokens * m.vocab_size) / GIB


def run_memory_gib(cfg: RunConfig, model_dir: str | Path) -> float:
    """A generous estimate of one colocated run's peak GPU memory: the trainer's weights, gradients and
    Adam state (18 bytes a parameter), and for its largest micro-batch the fp32 logits (three copies:
    logits, log-softmax, gradient), activations and, with train.attention=local, attention scores and
    probabilities (Megatron's local attention keeps both, in bf16); the engine's weights, a KV cache of
    step_kv_tokens and a fixed allowance for CUDA graphs, workspace and the processes' CUDA contexts. Its
    constants were set against nvidia-smi peaks of two runs sharing an H200 (benchmarks/results/README.md,
    the `h200-twice-run*` rows)."""
    m = ArchMeta.from_hf_dir(model_dir)
    h, kv = m.hidden_size, m.num_kv_heads * m.head_dim
    params = _params(m)
    t = cfg.train
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    tokens = t.micro_batch_tokens or t.micro_batch_size * longest
    # local attention keeps s x s scores and probabilities; fused attention only K/V repeated for GQA
    attention = longest * m.num_heads if t.attention == "local" else m.num_heads * m.head_dim
    trainer = 18 * params + tokens * (12 * m.vocab_size + 40 * m.num_layers * h + 4 * attention * m.num_layers)
    engine = 2 * params + step_kv_tokens(cfg) * m.num_layers * 2 * kv * 2 + 6.5 * GIB
    return (trainer + engine) / GIB


def run_config(cfg: RunConfig, mode: str) -> RunConfig:
    """The config each run gets under `mode`: shared_gpu gives it half of its GPU."""
    if mode != "shared_gpu":
        return cfg
    data = cfg.model_dump()
    data["resources"]["gpu_share"] = SHARED_GPU_SHARE
    return RunConfig.model_validate(data)  # validated: a run that cannot share a GPU is refused here


def choose(
    cfg: RunConfig,
    gpus: int | None = None,
    *,
    model_dir: str | Path | None = None,
    gpu_gib: float | None = None,
    host_gib: float | None = None,
) -> tuple[str, str]:
    """(mode, why): sequential, side_by_side or shared_gpu. Raises ConfigError when side_by_side is asked
    for and this machine cannot hold it. Sharing one GPU is chosen by auto only when `model_dir` is
    given and two runs' estimated memory (run_memory_gib) fits in 90 % of it. On the CPU, auto puts the
    runs side by side when the cores hold both and, given `model_dir`, the memory available now holds
    two runs' estimate (cpu_run_memory_gib): two runs that do not fit get killed by the OS or by Ray's
    memory monitor halfway, and one after the other they finish."""
    mode, need = cfg.resources.twice, 2 * cfg.gpus_per_run
    if cfg.resources.ray_address:
        if mode == "auto":
            return "sequential", (
                f"auto does not size a Ray cluster; set resources.twice=side_by_side when it has {need} GPUs free"
            )
        return mode, "as configured (Ray cluster)"
    if not cfg.on_gpu:
        if mode != "auto":
            return mode, "as configured"
        # a run keeps one phase busy at a time (rollout, then train) on cpu_threads per rank, so two runs
        # overlap well (side by side against one after the other: benchmarks/results/README.md, CPU records)
        cores, busy = os.cpu_count() or 1, cfg.resources.trainer_ranks * cfg.resources.cpu_threads
        if cores < 2 * busy:
            return "sequential", f"{cores} CPU core(s): one run at a time"
        if model_dir is not None:
            free = host_memory_gib() if host_gib is None else host_gib
            est = cpu_run_memory_gib(cfg, model_dir)
            if 2 * est > free:
                return "sequential", f"{free:.0f} GiB of memory free: one run at a time (about {est:.1f} GiB each)"
        return "side_by_side", f"{cores} CPU cores hold both runs ({busy} busy thread(s) each)"
    have = local_gpus() if gpus is None else gpus
    shareable = cfg.one_gpu_per_run
    if mode == "side_by_side" and have < need:
        if shareable and have >= 1:
            return "shared_gpu", "as configured: one GPU, half of it each"
        raise ConfigError(
            f"resources.twice=side_by_side needs {need} GPUs ({cfg.gpus_per_run} per run) but this "
            f"machine has {have}"
            + ("" if shareable else " (runs share a GPU only with one GPU per run and SGLang)")
            + "; use resources.twice=sequential (or auto)"
        )
    if mode != "auto":
        return mode, "as configured"
    if have >= need:
        return "side_by_side", f"{have} GPUs hold both runs ({cfg.gpus_per_run} each)"
    if shareable and have >= 1 and model_dir is not None:
        total = gpu_memory_gib() if gpu_gib is None else gpu_gib
        est = run_memory_gib(cfg, model_dir)
        if 2 * est <= 0.9 * total:
            return "shared_gpu", f"one GPU of {total:.0f} GiB holds both runs (about {est:.0f} GiB each)"
        return "sequential", f"one GPU of {total:.0f} GiB: one run at a time (about {est:.0f} GiB each)"
    return "sequential", f"{have} GPU(s): one run at a time ({cfg.gpus_per_run} each)"


def run_both(
    run_a: Callable[[], T], run_b: Callable[[], T], mode: str, hold: AbstractContextManager[Any] | None = None
) -> tuple[T, T]:
    """Run both; side by side, both finish (or fail) before an error of either is raised. `hold` is
    entered around both runs (session.shared_ray: their Ray, started once in this thread, as the flow
    does; one after the other, run B would otherwise pay a second Ray start and stop)."""
    with hold or nullcontext():
        if mode == "sequential":
            return run_a(), run_b()
        with ThreadPoolExecutor(2, thread_name_prefix="detrl-run") as pool:
            fa, fb = pool.submit(run_a), pool.submit(run_b)
            errors = [f.exception() for f in (fa, fb)]
    for err in errors:
        if err is not None:
            raise err
    return fa.result(), fb.result()
