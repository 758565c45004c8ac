"""Golden ledgers: the last known-good ledger per (config, hardware), so a nightly run is compared not
only with its twin but with last week's. Drift in the software stack (library versions, driver, CUDA)
is exactly what this catches, so the key holds only the config hash and the hardware class; the rest of
the fingerprint is compared and reported when the hashes move."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError
from .ledger import LEDGER_FILE, STEP_DIR, read_ledger
from .util import atomic_dir, default_dir, utc_stamp
from .verify import Verdict, compare, dict_diff, fingerprint_diff


def hardware_class(header: dict[str, Any]) -> dict[str, Any]:
    """What bitwise equality is expected across: GPU models and count per role, or CPU ISA."""
    out = {}
    for role, fp in sorted(header.get("fingerprints", {}).items()):
        gpu = fp.get("gpu", {})
        out[role] = {"gpus": gpu.get("names") or [], "cpu": fp.get("cpu_capability"), "machine": fp.get("machine")}
    return out


def golden_key(header: dict[str, Any]) -> str:
    blob = json.dumps({"config": header.get("config_hash"), "hardware": hardware_class(header)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class GoldenResult:
    status: str  # "recorded" | "matches" | "differs" | "updated"
    key: str
    golden_dir: str
    verdict: Verdict | None = None
    changed_since: list[str] = field(default_factory=list)
    recorded_at: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "differs"

    def text(self) -> str:
        if self.status == "recorded":
            return (
                f"golden: no known-good ledger for this config and hardware yet; recorded this run ({self.golden_dir})"
            )
        if self.status == "updated":
            return f"golden: replaced the known-good ledger with this run ({self.golden_dir})"
        if self.status == "matches":
            return f"golden: matches the known-good ledger recorded {self.recorded_at} ({self.golden_dir})"
        d = self.verdict.first if self.verdict else None
        where = f" first at {d.where()}" if d else ""
        changed = "; ".join(self.changed_since[:10]) or "no fingerprint field changed"
        return (
            f"golden: DIFFERS from the known-good ledger recorded {self.recorded_at}{where}. "
            f"Changed since then: {changed}"
        )


def check(run_dir: str | Path, store: str | Path | None = None, *, update: bool = False) -> GoldenResult:
    """Compare a complete run with the golden ledger of its config and hardware; record it as the
    golden when there is none (or when `update`)."""
    run = read_ledger(run_dir)
    if not run.complete:
        raise ConfigError(
            f"{run_dir}: only a complete, valid ledger can be compared with or become a golden: {run.problems[:2]}"
        )
    assert run.header is not None  # a complete ledger has one
    key = golden_key(run.header)
    gdir = Path(store or default_dir("golden")) / key
    meta_file = gdir / "golden.json"
    if update or not meta_file.exists():
        existed = meta_file.exists()
        with atomic_dir(gdir) as tmp:
            shutil.copy2(Path(run_dir) / LEDGER_FILE, tmp / LEDGER_FILE)
            if (Path(run_dir) / STEP_DIR).is_dir():
                shutil.copytree(Path(run_dir) / STEP_DIR, tmp / STEP_DIR)
            (tmp / "golden.json").write_text(
                json.dumps(
                    {
                        "recorded_at": utc_stamp(),
                        "source": str(run_dir),
                        "config_hash": run.header["config_hash"],
                        "hardware": hardware_class(run.header),
                    },
                    indent=1,
                )
            )
        return GoldenResult("updated" if existed else "recorded", key, str(gdir))
    meta = json.loads(meta_file.read_text())
    golden = read_ledger(gdir)
    verdict = compare(golden, run)
    # the known-good ledger may be this very run (a copy, recorded by --update): it matches itself
    status = "matches" if verdict.status in ("identical", "same_run") else "differs"
    changed = [] if status == "matches" or golden.header is None else _changed(golden.header, run.header)
    return GoldenResult(status, key, str(gdir), verdict, changed, meta.get("recorded_at"))


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = fingerprint_diff(old, new, across_hosts=True)
    return out + [f"engine.{d}" for d in dict_diff(old.get("engine", {}), new.get("engine", {}))]
