"""Reading a det-rl flow run's final state: one rule for the flow's own CLI entry and the notify hook."""

from __future__ import annotations

from typing import Any


def result_of(state: Any) -> dict[str, Any]:
    """The flow's result dict: a Completed state returns it; a Failed one carries it as its data. Empty
    when neither holds one (a crash before the runs)."""
    try:
        res = state.result(raise_on_failure=False)
    except Exception:  # a result that cannot be read (not persisted, or the crash itself)
        res = None
    if isinstance(res, dict):
        return res
    return state.data if isinstance(state.data, dict) else {}
