"""What a run needs before its loop starts, each step cached and each cache entry checked against the
hash recorded when it was written: the model, the dataset, and the Megatron conversion. `prepare` runs
the three; the flow runs them as separate Prefect tasks; both call the same step functions here. A run
may start before its conversion ends (`Converting`): only its trainers' load needs the checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .convert import ConvertedArtifact, convert_cached, converted_dir
from .data import DatasetArtifact, fetch_dataset
from .models import ModelArtifact, fetch_model
from .ray.errors import RunError


class ConversionFailed(RunError):
    """The conversion a run waited for failed; a retried run would wait for the same failure."""


@dataclass(frozen=True)
class Converting:
    """A conversion still running: where its entry will be (named by the model's hash) and how to wait
    for it. A run starts its workers meanwhile; its trainers wait for it before they load the checkpoint."""

    path: str
    result: Callable[[], ConvertedArtifact]


def converting(model_art: ModelArtifact, cache_dir: str | Path, result: Callable[[], ConvertedArtifact]) -> Converting:
    return Converting(str(converted_dir(model_art, cache_dir)), result)


@dataclass
class Artifacts:
    model: ModelArtifact
    data: DatasetArtifact
    megatron: ConvertedArtifact | Converting
    compile_cache: str | None = None  # Triton, Inductor and flashinfer JIT caches of the workers

    @property
    def checkpoint(self) -> str:
        """The trainers' torch_dist checkpoint (while the conversion runs: where it will be)."""
        return str(Path(self.megatron.path) / "weights")

    def converted(self) -> ConvertedArtifact:
        """The conversion, once it has ended (its error, when it failed)."""
        if isinstance(self.megatron, Converting):
            try:
                art = self.megatron.result()
            except Exception as exc:
                raise ConversionFailed(f"the HF -> Megatron conversion this run waits for failed: {exc}") from exc
            if art.path != self.megatron.path:
                raise ConversionFailed(f"the conversion wrote {art.path}, not {self.megatron.path} as the run expected")
            self.megatron = art
        return self.megatron


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
