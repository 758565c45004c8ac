"""The run directory (`--out`): checked before any download, conversion or worker start, and never
clobbered. A run goes only into a new or empty directory; `--resume` only into one that holds a
ledger of the same semantic config."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .config import ConfigError, RunConfig, semantic_part
from .ledger import LEDGER_FILE, LEDGER_VERSION, read_ledger
from .verify import dict_diff


def _writable(p: Path) -> None:
    """Prove `p` (or, when it does not exist yet, its nearest existing parent) takes a file, without
    creating `p`: a run that fails later leaves no empty directory behind."""
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is not a directory")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write the run directory {p}: {exc.strerror or exc}; choose a writable --out"
        ) from None


def resume_mismatch(run_dir: Path, cfg: RunConfig) -> str | None:
    """Why `cfg` cannot continue the run in `run_dir` (its semantic config differs), or None."""
    header = read_ledger(run_dir).header
    if header is None or header.get("config_hash") == cfg.config_hash():
        return None
    changed = dict_diff(
        semantic_part(header.get("config") or {}, header.get("version", LEDGER_VERSION)), cfg.semantic_dict()
    )
    return (
        f"{run_dir} was started with a different config ({'; '.join(changed[:5]) or 'the config hash differs'}); "
        "resume it with the same profile and overrides as the run it continues"
    )


def check_out_dir(path: str | Path, cfg: RunConfig | None = None, *, resume: bool = False) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p} is a file, not a directory; choose a new directory")
    has_ledger = (p / LEDGER_FILE).exists()
    if resume:
        if not has_ledger:
            raise ConfigError(
                f"--resume: {p} holds no {LEDGER_FILE}, so there is no run to continue; "
                "drop --resume to start a new run there"
            )
        if cfg is not None and (why := resume_mismatch(p, cfg)):
            raise ConfigError(why)
        _writable(p)
        return p
    if has_ledger:
        led = read_ledger(p)
        state = "a complete" if led.complete else f"an unfinished ({len(led.iterations)} iterations)"
        raise ConfigError(
            f"{p} already holds {state} run ledger; choose a new --out directory "
            "(or --resume to continue an interrupted run from its last checkpoint)"
        )
    if p.is_dir():
        entries = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir())
        if entries:
            shown = ", ".join(entries[:6]) + (f" (+{len(entries) - 6} more)" if len(entries) > 6 else "")
            raise ConfigError(
                f"--out {p} is not empty ({shown}); det-rl writes a run only into a new or empty "
                "directory, so nothing of another run is overwritten or mixed in: choose a new "
                "--out or empty this one"
            )
    _writable(p)
    return p
