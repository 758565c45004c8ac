"""Cache entries are written whole, by any number of concurrent writers."""

import multiprocessing as mp
import time
from pathlib import Path

from detrl.util import atomic_dir


def _writer(root: str, k: int, n: int) -> None:
    for i in range(n):
        with atomic_dir(Path(root) / "entry") as tmp:
            for part in ("a", "b", "c"):
                (tmp / part).write_text(f"{k}-{i}")


def _reader(root: str, n: int, q) -> None:
    seen = 0
    deadline = time.monotonic() + 60
    while not (Path(root) / "entry").exists() and time.monotonic() < deadline:
        time.sleep(0.001)  # the writers start slower (spawn): read once there is something to read
    for _ in range(n):
        try:
            (Path(root) / "entry" / "a").read_text()
        except FileNotFoundError:  # a reader may see the entry missing for a moment: a cache miss
            continue
        seen += 1
    q.put(seen)


def test_three_writers_300_times_each_never_fail_or_leave_a_mixed_entry(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), k, 300)) for k in range(3)]
    reader = ctx.Process(target=_reader, args=(str(tmp_path), 3000, q))
    for p in writers:
        p.start()
    reader.start()
    for p in [*writers, reader]:
        p.join(120)
    assert [p.exitcode for p in writers] == [0, 0, 0]
    parts = {(tmp_path / "entry" / p).read_text() for p in ("a", "b", "c")}
    assert len(parts) == 1 and parts.pop().endswith("-299")
    assert sorted(x.name for x in tmp_path.iterdir()) == [".entry.lock", "entry"]  # no temp dirs left
    assert reader.exitcode == 0
    assert q.get(timeout=5) > 0  # readers ran alongside and never crashed
