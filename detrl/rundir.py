"""The run directory (`--out`): checked before any download, conversion or worker start, and never
clobbered. A run goes only into a new or empty directory; `--resume` only into one that holds a
ledger of the same semantic config."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError, RunConfig, semantic_part
from .ledger import LEDGER_FILE, LEDGER_VERSION, read_ledger
from .verify import dict_diff

LOCK_FILE = ".detrl.lock"
_held: dict[Path, int] = {}  # run directories this process holds, so nested holders share one lock


def _holder(p: Path) -> str | None:
    """The pid that holds `p`'s lock now, or None when nobody does."""
    path = p / LOCK_FILE
    if p.resolve() in _held or not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """One writer per run directory: an exclusive flock on DIR/.detrl.lock, taken before anything is written
    and held to the end. The OS drops it when the process dies, even by kill -9, so a stale file never
    blocks a resume; the file is removed when the run ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _held:
        yield
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"{run_dir} is being written by another det-rl run (pid {holder}); wait for it to finish or stop it, "
            "or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _writable(p: Path, what: str = "the run directory", fix: str = "choose a writable --out") -> None:
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
        raise ConfigError(f"cannot write {what} {p}: {exc.strerror or exc}; {fix}") from None


def check_cache_dir(path: str | Path) -> None:
    """The cache must take files before any download starts."""
    _writable(Path(path).expanduser(), "the cache directory", "choose a writable --cache (or $DETRL_CACHE)")


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
    if p.is_dir() and (pid := _holder(p)) is not None:
        raise ConfigError(
            f"--out {p} is being written by another det-rl run (pid {pid}); wait for it to finish or stop it, "
            "or choose another --out"
        )
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
        entries = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir() if x.name != LOCK_FILE)
        if entries:
            shown = ", ".join(entries[:6]) + (f" (+{len(entries) - 6} more)" if len(entries) > 6 else "")
            raise ConfigError(
                f"--out {p} is not empty ({shown}); det-rl writes a run only into a new or empty "
                "directory, so nothing of another run is overwritten or mixed in: choose a new "
                "--out or empty this one"
            )
    _writable(p)
    return p
