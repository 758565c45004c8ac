"""Which config a command or the flow runs: `auto` becomes a profile for this host (the one place that
probes for a GPU and SGLang), then the file, the overrides and the seed apply (`config.load_config`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config


def resolve_profile(name: str) -> tuple[str, str]:
    """'auto' -> the reference profile on a machine with a GPU and SGLang, else tiny-cpu.
    Returns (profile, why)."""
    if name != "auto":
        return name, "as requested"
    import torch  # only here: the config module stays importable without torch (benchmarks/cli_speed.py)

    if torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None:
        return "gsm8k-qwen2.5-0.5b", f"{torch.cuda.device_count()} GPU(s) and SGLang found"
    why = "no GPU found" if not torch.cuda.is_available() else "SGLang is not installed"
    return "tiny-cpu", f"{why}: running the tiny CPU profile (a random tiny Qwen2, builtin GSM8K rows)"


def resolve(
    profile: str | None,
    *,
    config_file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    seed: int | None = None,
) -> tuple[RunConfig, str]:
    """The config a command or the flow runs, from their arguments: `auto` resolved to a profile (the
    second item says to which and why; empty otherwise), then the file, the overrides and the seed."""
    why = ""
    if profile == "auto":
        profile, reason = resolve_profile("auto")
        why = f"profile auto -> {profile} ({reason})"
    return load_config(profile, config_file=config_file, overrides=overrides, seed=seed), why
