"""The reward: a builtin (`gsm8k`, `hash`) or the user's own function, named `module:function` or
`path/to/file.py:function`. A user reward is `fn(response: str, answer: str, meta: dict) -> float`:
the decoded response, the row's gold answer, and the sample's metadata (its dataset row's other
fields, the iteration and the sample's index). An import error or a wrong signature stops the run before
any download, a non-float return on a probe of the first dataset row before any worker starts, each
with the fix.

The reward's identity (its name and the SHA-256 of its module's source) is recorded in the ledger
header beside the model and data hashes: a reward whose code changed between two runs is named first
by the verdict."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data
from .config import ConfigError

BUILTIN_REWARDS = ("gsm8k", "hash")
_USER = re.compile(r"^(?P<module>[^:]+):(?P<function>[A-Za-z_]\w*)$")
UserFn = Callable[[str, str, dict[str, Any]], float]


@dataclass(frozen=True)
class Reward:
    name: str
    sha256: str  # of the builtin's or the user's module source
    score: Callable[[Sequence[int], str, dict[str, Any]], float]  # (token ids, gold answer, meta) -> reward

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


def _source_sha(module: Any) -> str:
    try:
        src = inspect.getsource(module)
    except (OSError, TypeError):
        src = Path(getattr(module, "__file__", "") or "").read_text() if getattr(module, "__file__", None) else ""
    return hashlib.sha256(src.encode()).hexdigest()


def _functions_sha(*fns: Any) -> str:
    """A builtin's identity: the source of its functions, not of the module around them."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in fns).encode()).hexdigest()


_GSM8K = (data.gsm8k_reward, data.extract_answer, data.extract_gold, data.normalize_number, data._last_boxed)


def _import(spec: str) -> tuple[Any, UserFn]:
    m = _USER.match(spec)
    if m is None:
        raise ConfigError(
            f"reward {spec!r} is neither a builtin ({', '.join(BUILTIN_REWARDS)}) nor MODULE:FUNCTION "
            "(e.g. my_rewards:score, or path/to/rewards.py:score)"
        )
    where, name = m["module"], m["function"]
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            mod_name = f"detrl_user_reward_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            spec_ = importlib.util.spec_from_file_location(mod_name, path)
            assert spec_ is not None and spec_.loader is not None
            module = importlib.util.module_from_spec(spec_)
            sys.modules[mod_name] = module
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as exc:
        raise ConfigError(
            f"reward {spec!r}: cannot import {where!r} ({type(exc).__name__}: {exc}); put the module on "
            "PYTHONPATH or name its file (path/to/rewards.py:function)"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {where!r} has no function {name!r}")
    try:
        inspect.signature(fn).bind("response", "answer", {})
    except TypeError:
        raise ConfigError(
            f"reward {spec!r}: {name}{inspect.signature(fn)} must take (response: str, answer: str, meta: dict)"
        ) from None
    except ValueError:
        pass  # a builtin without a signature: the probe call decides
    return module, fn


def _checked(spec: str, fn: UserFn, response: str, answer: str, meta: dict[str, Any]) -> float:
    got = fn(response, answer, meta)
    if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got):
        raise ConfigError(f"reward {spec!r} returned {got!r} ({type(got).__name__}); it must return a finite float")
    return float(got)


def load(spec: str, tokenizer: Any, probe: tuple[str, dict[str, Any]] = ("#### 0", {})) -> Reward:
    """The reward named `spec`; a user reward is imported and called once on `probe` (an empty response
    with a real row's answer and meta, before any worker starts). `tokenizer` decodes responses."""
    if spec == "hash":
        return Reward("hash", _functions_sha(data.hash_reward), lambda ids, a, meta: data.hash_reward(ids))
    if spec == "gsm8k":

        def gsm8k(ids: Sequence[int], answer: str, meta: dict[str, Any]) -> float:
            return data.gsm8k_reward(tokenizer.decode(list(ids), skip_special_tokens=True), answer)

        return Reward("gsm8k", _functions_sha(*_GSM8K), gsm8k)
    module, fn = _import(spec)
    try:
        _checked(spec, fn, "", *probe)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"reward {spec!r} raised {type(exc).__name__}: {exc} on a probe (response '', the first row's answer "
            f"{probe[0]!r:.60} and meta keys {sorted(probe[1])}); it must return a float for any response text"
        ) from None

    def score(ids: Sequence[int], answer: str, meta: dict[str, Any]) -> float:
        return _checked(spec, fn, tokenizer.decode(list(ids), skip_special_tokens=True), answer, meta)

    return Reward(spec, _source_sha(module), score)


def check(spec: str) -> None:
    """Refuse a reward that cannot be imported or called as fn(response, answer, meta), before any download
    (ConfigError with the fix); `load` then probes it on a real row before any worker starts."""
    if spec not in BUILTIN_REWARDS:
        _import(spec)
