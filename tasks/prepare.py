"""Config resolution, downloads and conversion. Cache keys name what the result depends on, and
are None (run, don't trust the cache) unless the result's files are still there and intact."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from detrl.config import RunConfig, load_config, resolve_profile
from detrl.convert import CONVERTER_VERSION, ConvertedArtifact, cached_conversion, convert_cached
from detrl.data import DatasetArtifact, cached_dataset, fetch_dataset
from detrl.models import ModelArtifact, cached_model, fetch_model
from detrl.util import HF_PATTERNS, entry_stamp, tree_sha256
from detrl.workers import check_resources


@task(name="resolve-config", cache_policy=NO_CACHE)
def resolve_config(profile: str, seed: int | None, overrides: dict[str, Any], extra: list[str]) -> RunConfig:
    log = get_run_logger()
    name, why = resolve_profile(profile)
    log.info(f"profile {name}: {why}")
    cfg = load_config(name, overrides={**overrides, **dict(_split(x) for x in extra)}, seed=seed)
    check_resources(cfg)
    return cfg


def _split(item: str) -> tuple[str, Any]:
    from detrl.config import parse_override

    parts, value = parse_override(item)
    return ".".join(parts), value


def _model_key(ctx: Any, p: dict[str, Any]) -> str | None:
    cfg: RunConfig = p["cfg"]
    path = cached_model(cfg.model, p["cache_dir"], _device(cfg))  # None unless present and unchanged
    if path is None:
        return None
    m = cfg.model
    if m.source == "hub":
        return f"detrl-model|hub|{m.name}@{m.revision or 'main'}|{path}"
    # local and det-rl-built models: keyed by content (a local directory is the user's to change)
    return f"detrl-model|{m.source}|{path}#{entry_stamp(path) or tree_sha256(path, HF_PATTERNS)}"


def _device(cfg: RunConfig) -> str:
    return "cuda" if cfg.on_gpu else "cpu"


@task(name="download-model", cache_key_fn=_model_key, persist_result=True)
def download_model(cfg: RunConfig, cache_dir: str, refresh: bool = False) -> ModelArtifact:
    art = fetch_model(cfg.model, cache_dir, device=_device(cfg), refresh=refresh)
    get_run_logger().info(f"model {art.source}:{art.name} at {art.path} (sha256 {art.sha256[:16]})")
    return art


def _data_key(ctx: Any, p: dict[str, Any]) -> str | None:
    art = cached_dataset(p["cfg"].data, p["cache_dir"])
    return None if art is None else f"detrl-data|{art.source}|{art.name}|{art.sha256}|{art.path}"


@task(name="download-dataset", cache_key_fn=_data_key, persist_result=True)
def download_dataset(cfg: RunConfig, cache_dir: str, refresh: bool = False) -> DatasetArtifact:
    art = fetch_dataset(cfg.data, cache_dir, refresh=refresh)
    get_run_logger().info(f"dataset {art.source}:{art.name}: {art.rows} rows (sha256 {art.sha256[:16]})")
    return art


def _convert_key(ctx: Any, p: dict[str, Any]) -> str | None:
    model: ModelArtifact = p["model"]
    art = cached_conversion(model, p["cache_dir"])  # None unless complete and unchanged
    return None if art is None else f"detrl-convert|{model.sha256}|v{CONVERTER_VERSION}|{art.path}"


@task(name="convert-hf-to-megatron", cache_key_fn=_convert_key, persist_result=True)
def convert_checkpoint(model: ModelArtifact, cache_dir: str, refresh: bool = False) -> ConvertedArtifact:
    art = convert_cached(model, cache_dir, refresh=refresh)
    get_run_logger().info(f"Megatron torch_dist checkpoint at {art.path} (converter v{art.converter_version})")
    return art
