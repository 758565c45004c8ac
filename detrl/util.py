"""Small shared helpers: atomic file writes, file hashing, names."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

T = TypeVar("T")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and move it into place only if the block succeeds.

    Safe with any number of concurrent writers (processes, or Ray workers on a shared filesystem):
    the swap holds a file lock beside `path`, and an entry already in place is first renamed aside,
    so `path` is always either a whole old entry or a whole new one (never a mix, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        with FileLock(path.parent / f".{path.name}.lock"):
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / "entry")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: str | Path, patterns: tuple[str, ...] = ("*",), *, hidden: bool = False) -> str:
    """One hash over the relative names and contents of the files under `root` matching `patterns`
    (dot files only with `hidden`)."""
    root = Path(root)
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix()
        if not hidden and any(part.startswith(".") for part in Path(rel).parts):
            continue
        h.update(rel.encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- cache entries

# Every cache entry det-rl writes records the hash of its content when written, and is checked
# against it when used: a changed file is named, never silently used or silently rebuilt around.
ENTRY_STAMP = ".detrl-entry.json"
HF_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")  # what makes an HF checkpoint
REFRESH_HINT = "rebuild it with --refresh (the flow's refresh=true), or delete the directory"


class CacheError(RuntimeError):
    """A cache entry's files no longer match the hash recorded when it was written."""


def stamp_entry(entry: str | Path, sha256: str) -> None:
    atomic_write_text(Path(entry) / ENTRY_STAMP, json.dumps({"sha256": sha256}))


def entry_stamp(entry: str | Path) -> str | None:
    """The recorded content hash of a cache entry; None when it has none (unfinished or written by
    an older det-rl: treat as absent and rebuild)."""
    f = Path(entry) / ENTRY_STAMP
    try:
        return json.loads(f.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_entry(entry: str | Path, sha256_now: str) -> None:
    recorded = entry_stamp(entry)
    if recorded is not None and recorded != sha256_now:
        raise CacheError(
            f"cache entry {entry} does not match the hash recorded when it was written "
            f"(recorded {recorded[:16]}, now {sha256_now[:16]}): a file in it changed on disk; " + REFRESH_HINT
        )


# ---------------------------------------------------------------- downloads

_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutError",
    "TimeoutException",
    "NetworkError",
    "RemoteProtocolError",
    "ProtocolError",
    "ReadError",
    "ChunkedEncodingError",
    "ConnectionResetError",
    "ConnectionRefusedError",
    "IncompleteRead",
    "RemoteDisconnected",
    "MaxRetryError",
    "NewConnectionError",
}


def is_network_error(exc: BaseException) -> bool:
    """A failure worth retrying: the connection failed, timed out, or the server said 5xx/429. Not a
    missing repo, revision or file, a gated repo or any other 4xx: those are the input's fault."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OfflineModeIsEnabled" or "OfflineModeIsEnabled" in str(e):
            return False  # offline on purpose (HF_HUB_OFFLINE): waiting will not bring the network back
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status >= 500 or status == 429
        if any(c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_network(fn: Callable[[], T], what: str) -> T:
    """Call `fn`, retrying network errors with exponential backoff: $DETRL_DOWNLOAD_RETRIES retries
    (default 3) after $DETRL_DOWNLOAD_BACKOFF_S (default 2) x 4^k seconds."""
    retries = int(os.environ.get("DETRL_DOWNLOAD_RETRIES", "3"))
    backoff = float(os.environ.get("DETRL_DOWNLOAD_BACKOFF_S", "2"))
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == retries or not is_network_error(exc):
                raise
            delay = backoff * 4**attempt
            logging.getLogger("detrl").warning(
                f"{what}: network error ({type(exc).__name__}); retry {attempt + 1}/{retries} in {delay:.1f} s"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def utc_stamp() -> str:
    """Now, as the ledger, checkpoints and golden records write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_DEFAULT_DIRS = {
    "cache": ("DETRL_CACHE", (".cache", "detrl")),
    "runs": ("DETRL_RUNS", (".detrl", "runs")),
    "golden": ("DETRL_GOLDEN", (".detrl", "golden")),
}


def default_dir(kind: str) -> str:
    """Where det-rl keeps `kind` (cache, runs, golden): $DETRL_<KIND> or a folder under home, read at call time."""
    env, parts = _DEFAULT_DIRS[kind]
    return os.environ.get(env) or str(Path.home().joinpath(*parts))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"
