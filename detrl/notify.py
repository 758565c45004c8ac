"""Telling a team that a nightly failed: the message (run, verdict, first divergence, likely cause)
and its delivery to a webhook URL as a JSON POST. Prefect notification blocks are delivered by the
flow's hook (tasks/notify.py); this module has no Prefect import."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

ENV = "DETRL_NOTIFY"


def target(param: str | None) -> str | None:
    """Where to send: the flow's `notify` parameter, else $DETRL_NOTIFY; None: nowhere."""
    return (param or os.environ.get(ENV) or "").strip() or None


def is_webhook(dest: str) -> bool:
    return dest.startswith(("http://", "https://"))


_BLOCK = re.compile(r"^[a-z0-9][a-z0-9-]*/[A-Za-z0-9][A-Za-z0-9_-]*$")


def target_problem(dest: str) -> str | None:
    """Why `dest` is not a notify target (None if it may be): an http(s) URL with a host, or a Prefect block's
    TYPE/NAME (whether that block exists is checked by the flow, which has Prefect)."""
    if is_webhook(dest):
        host = urllib.parse.urlsplit(dest).hostname
        return None if host else f"notify target {dest!r} is a URL without a host"
    if _BLOCK.fullmatch(dest):
        return None
    return (
        f"notify target {dest!r} is neither an http(s) URL nor a Prefect notification block as TYPE/NAME "
        "(e.g. slack-webhook/nightly); set the flow's notify parameter or $DETRL_NOTIFY to one"
    )


def message(
    *, flow_run: str, state: str, state_message: str | None, ui_url: str | None, result: dict[str, Any] | None
) -> dict[str, Any]:
    """The payload: everything a reader needs without opening the UI."""
    result = result or {}
    verdict = result.get("verdict") or {}
    subject = f"det-rl {flow_run}: {state}"
    if verdict.get("status"):
        subject += f" ({verdict['status'].upper()})"
    lines = [subject]
    if verdict.get("first"):
        lines.append(f"first divergence: {verdict['first']}")
    if verdict.get("likely_cause"):
        lines.append(f"likely cause: {verdict['likely_cause']}")
    if state_message and state_message not in "\n".join(lines):
        lines.append(state_message)
    if result.get("runs"):
        lines.append(f"ledgers: {result['runs']}")
    if ui_url:
        lines.append(ui_url)
    return {
        "subject": subject,
        "text": "\n".join(lines),
        "flow_run": flow_run,
        "state": state,
        "message": state_message,
        "ui_url": ui_url,
        "verdict": verdict.get("status"),
        "first_divergence": verdict.get("first"),
        "likely_cause": verdict.get("likely_cause"),
        "runs": result.get("runs"),
        "profile": result.get("profile"),
    }


def post_json(
    url: str, payload: dict[str, Any], *, attempts: int = 3, timeout: float = 10.0, backoff: float = 1.0
) -> int:
    """POST `payload` as JSON; retries connection errors and 5xx with exponential backoff, not 4xx.
    Returns the HTTP status."""
    body = json.dumps(payload).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "det-rl"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts - 1:
                raise
        except (urllib.error.URLError, OSError):
            if attempt == attempts - 1:
                raise
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
