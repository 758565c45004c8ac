"""The flow's state hook: on Failed or Crashed (and on Completed when `notify_on_success`), send
the verdict to the `notify` parameter's target or $DETRL_NOTIFY: a webhook URL (JSON POST) or the
name of a Prefect notification block ("slack-webhook/nightly", "custom-webhook/ops", ...)."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from prefect.logging import get_logger
from prefect.utilities.urls import url_for

from detrl.config import ConfigError
from detrl.notify import is_webhook, message, post_json, target, target_problem

from .state import result_of


def check_target(param: str | None) -> None:
    """At flow start, before any work: the notify target (parameter or $DETRL_NOTIFY) is an http(s) URL or
    a notification block that exists. ConfigError with the fix otherwise."""
    dest = target(param)
    if dest is None:
        return
    if (why := target_problem(dest)) is not None:
        raise ConfigError(why)
    if not is_webhook(dest):
        try:
            Block.load(dest)
        except Exception as exc:
            raise ConfigError(
                f"notify target {dest!r}: no Prefect block of that TYPE/NAME here ({type(exc).__name__}); create "
                "it (Prefect UI, Blocks) or use an http(s) webhook URL"
            ) from None


def notify_hook(flow: Any, flow_run: Any, state: Any) -> None:
    params = flow_run.parameters or {}
    dest = target(params.get("notify"))
    if dest is None or (state.is_completed() and not params.get("notify_on_success")):
        return
    log = get_logger("det-rl.notify")
    payload = message(
        flow_run=flow_run.name,
        state=state.name,
        state_message=state.message,
        ui_url=url_for(flow_run),
        result=result_of(state) or None,
    )
    try:
        if is_webhook(dest):
            post_json(dest, payload)
        else:
            block: Any = Block.load(dest)  # sync here: the hook runs in a sync context
            block.notify(body=payload["text"], subject=payload["subject"])
        log.info(f"notified {dest if not is_webhook(dest) else 'the webhook'}: {payload['subject']}")
    except Exception as exc:
        log.error(f"could not notify {dest!r}: {type(exc).__name__}: {exc}")
