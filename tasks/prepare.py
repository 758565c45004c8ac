"""Config resolution, downloads and conversion. One cache layer, the library's: each call reuses its
cache entry after checking it against the hash recorded when it was written, so these tasks are not
cached by Prefect (a cached task result could point at files that have since changed)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from detrl import artifacts
from detrl.config import RunConfig, parse_override
from detrl.convert import ConvertedArtifact
from detrl.data import DatasetArtifact
from detrl.doctor import check_resources
from detrl.models import ModelArtifact
from detrl.resolve import resolve
from detrl.rollout import attention_ahead


@task(name="resolve-config", cache_policy=NO_CACHE)
def resolve_config(
    profile: str, seed: int | None, overrides: dict[str, Any], extra: list[str], config_file: str | None = None
) -> RunConfig:
    pairs = {".".join(parts): value for parts, value in map(parse_override, extra)}
    cfg, why = resolve(profile, config_file=config_file, overrides={**overrides, **pairs}, seed=seed)
    get_run_logger().info(why or f"profile {cfg.profile}")
    check_resources(cfg)
    return cfg


@task(name="download-model", cache_policy=NO_CACHE)
def download_model(cfg: RunConfig, cache_dir: str, refresh: bool = False) -> ModelArtifact:
    art = artifacts.model(cfg, cache_dir, refresh)
    get_run_logger().info(f"model {art.source}:{art.name} at {art.path} (sha256 {art.sha256[:16]})")
    return art


@task(name="download-dataset", cache_policy=NO_CACHE)
def download_dataset(cfg: RunConfig, cache_dir: str, refresh: bool = False) -> DatasetArtifact:
    art = artifacts.dataset(cfg, cache_dir, refresh)
    get_run_logger().info(f"dataset {art.source}:{art.name}: {art.rows} rows (sha256 {art.sha256[:16]})")
    return art


@task(name="convert-hf-to-megatron", cache_policy=NO_CACHE)
def convert_checkpoint(model: ModelArtifact, cache_dir: str, refresh: bool = False) -> ConvertedArtifact:
    art = artifacts.megatron(model, cache_dir, refresh)
    get_run_logger().info(f"Megatron torch_dist checkpoint at {art.path} (converter v{art.converter_version})")
    return art


@task(name="build-attention-module", cache_policy=NO_CACHE)
def build_attention_module(cfg: RunConfig, model: ModelArtifact, cache_dir: str) -> str:
    """flashinfer's attention module and SGLang's store_cache kernel for the engines, compiled while the
    conversion and the runs' start go on; it never fails the flow (an engine builds what was not built here)."""
    results = attention_ahead.build(cfg, model.path, artifacts.compile_cache_dir(cache_dir))
    for r in results:
        get_run_logger().info(r.text())
    return "; ".join(r.text() for r in results)
