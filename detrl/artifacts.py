"""What a run needs before its loop starts, each step cached and each cache entry checked against the
hash recorded when it was written: the model, the dataset, and the Megatron conversion. `prepare` runs
the three; the flow runs them as separate Prefect tasks; both call the same step functions here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .convert import ConvertedArtifact, convert_cached
from .data import DatasetArtifact, fetch_dataset
from .models import ModelArtifact, fetch_model


@dataclass
class Artifacts:
    model: ModelArtifact
    data: DatasetArtifact
    megatron: ConvertedArtifact
    compile_cache: str | None = None  # Triton, Inductor and flashinfer JIT caches of the workers


def model(cfg: RunConfig, cache_dir: str | Path, refresh: bool = False) -> ModelArtifact:
    # dequantized (GGUF) or generated (random) on the device the run trains on
    return fetch_model(cfg.model, cache_dir, device="cuda" if cfg.on_gpu else "cpu", refresh=refresh)


def dataset(cfg: RunConfig, cache_dir: str | Path, refresh: bool = False) -> DatasetArtifact:
    return fetch_dataset(cfg.data, cache_dir, refresh=refresh, gsm8k_answers=cfg.reward == "gsm8k")


def megatron(model_art: ModelArtifact, cache_dir: str | Path, refresh: bool = False) -> ConvertedArtifact:
    return convert_cached(model_art, cache_dir, refresh=refresh)


def compile_cache_dir(cache_dir: str | Path) -> str:
    return str(Path(cache_dir) / "compile")


def prepare(cfg: RunConfig, cache_dir: str | Path, *, refresh: bool = False) -> Artifacts:
    """Download (or generate) the model and dataset and convert the model (`refresh`: rebuilt instead)."""
    m = model(cfg, cache_dir, refresh)
    return Artifacts(
        m, dataset(cfg, cache_dir, refresh), megatron(m, cache_dir, refresh), compile_cache=compile_cache_dir(cache_dir)
    )
