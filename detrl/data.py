"""GSM8K: fetching (hub via `datasets`, local file, or the bundled sample), the deterministic
prompt order, prompt formatting, answer extraction, and the rewards. `datasets` and pyarrow are
imported only for a hub or parquet dataset: seconds of import that builtin and jsonl data never need."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import BUILTIN_DATASETS, ConfigError, DataConfig
from .util import REFRESH_HINT, CacheError, atomic_write_text, file_sha256, retry_network, slug

BUILTIN = {name: Path(__file__).parent / "assets" / file for name, file in BUILTIN_DATASETS.items()}


class DataError(RuntimeError):
    """The dataset cannot be fetched or does not have the expected shape."""


@dataclass(frozen=True)
class DatasetArtifact:
    """A dataset materialized as canonical jsonl (`question`, `answer`) in the cache."""

    path: str
    sha256: str
    rows: int
    source: str
    name: str


# ---------------------------------------------------------------- fetching


def _rows_from_file(path: Path, cfg: DataConfig) -> list[dict[str, Any]]:
    if not path.exists():
        raise DataError(
            f"data file {str(path)!r} does not exist (data.source=local expects a .jsonl or "
            ".parquet file, or a directory `datasets.load_dataset` can read)"
        )
    if path.is_dir():
        return _rows_from_datasets(str(path), cfg)
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{i + 1} is not valid JSON: {exc}") from None
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"data file {str(path)!r}: unsupported format {path.suffix!r} (use .jsonl or .parquet)")


def _rows_from_datasets(name: str, cfg: DataConfig, refresh: bool = False) -> list[dict[str, Any]]:
    """The hub path: `datasets.load_dataset` (also reads a local dataset directory)."""
    import datasets

    try:
        ds = retry_network(
            lambda: datasets.load_dataset(
                name,
                cfg.subset,
                split=cfg.split,
                revision=cfg.revision,
                download_mode="force_redownload" if refresh else None,
            ),
            f"download of dataset {name!r}",
        )
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        raise DataError(
            f"could not load dataset {name!r} (subset={cfg.subset!r}, split={cfg.split!r}, "
            f"revision={cfg.revision!r}): {type(exc).__name__}: {exc}. Without network access use "
            "data.source=local with data.name=PATH (a .jsonl/.parquet with question/answer fields) or "
            "data.source=builtin"
        ) from None
    return [dict(r) for r in ds]


def _canonical_rows(
    rows: list[dict[str, Any]], cfg: DataConfig, where: str, gsm8k_answers: bool = True
) -> list[dict[str, Any]]:
    """Rows as {question, answer[, meta]}: `meta` holds the row's other fields, which a user reward gets.
    `gsm8k_answers`: every answer must end in '#### <number>' (the gsm8k reward reads it)."""
    if not rows:
        raise DataError(f"{where}: no rows")
    missing = [f for f in (cfg.question_field, cfg.answer_field) if f not in rows[0]]
    if missing:
        raise DataError(
            f"{where}: rows lack field(s) {missing}; fields present: {sorted(rows[0])}. "
            "Set data.question_field / data.answer_field"
        )
    out = []
    for i, r in enumerate(rows):
        q, a = r.get(cfg.question_field), r.get(cfg.answer_field)
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip():
            raise DataError(f"{where}: row {i} has an empty or non-text question/answer")
        if gsm8k_answers and extract_gold(a) is None:
            raise DataError(
                f"{where}: row {i} answer has no final '#### <number>' (the gsm8k reward reads it): {a[-80:]!r}"
            )
        meta = {k: v for k, v in r.items() if k not in (cfg.question_field, cfg.answer_field)}
        out.append({"question": q, "answer": a, **({"meta": meta} if meta else {})})
    if cfg.limit is not None:
        out = out[: cfg.limit]
    return out


def fetch_dataset(
    cfg: DataConfig, cache_dir: str | Path, *, refresh: bool = False, gsm8k_answers: bool = True
) -> DatasetArtifact:
    """Materialize the configured dataset as canonical jsonl under `cache_dir` (atomic), read from its source
    every time; a cached file whose bytes changed stops the run (CacheError) unless `refresh`, which also
    downloads a hub dataset again and rewrites the file."""
    if cfg.source == "builtin" and cfg.name == "arith":
        from . import arith

        rows, where = arith.rows(cfg.split), f"builtin:arith/{cfg.split}"
    elif cfg.source == "builtin":
        if cfg.name not in BUILTIN:
            raise ConfigError(f"data.name {cfg.name!r} is not a builtin dataset; builtin: {sorted(BUILTIN)}")
        rows, where = _rows_from_file(BUILTIN[cfg.name], cfg), f"builtin:{cfg.name}"
    elif cfg.source == "local":
        rows, where = _rows_from_file(Path(cfg.name).expanduser(), cfg), cfg.name
    else:
        rows, where = _rows_from_datasets(cfg.name, cfg, refresh), f"hub:{cfg.name}"
    canon = _canonical_rows(rows, cfg, where, gsm8k_answers)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in canon)
    digest = hashlib.sha256(text.encode()).hexdigest()
    out = Path(cache_dir) / "datasets" / f"{slug(cfg.name)}-{cfg.split}-{digest[:16]}.jsonl"
    if out.exists() and not refresh and (now := file_sha256(out)) != digest:
        # one rule for every cache entry: a changed file stops the run, named, until --refresh rebuilds it
        raise CacheError(
            f"cache entry {out} does not match the hash in its name (expected {digest[:16]}, now {now[:16]}): "
            "the file changed on disk; " + REFRESH_HINT
        )
    if not out.exists() or refresh:
        atomic_write_text(out, text)
    art = DatasetArtifact(path=str(out), sha256=digest, rows=len(canon), source=cfg.source, name=cfg.name)
    return art


def read_dataset(artifact: DatasetArtifact) -> list[dict[str, Any]]:
    path = Path(artifact.path)
    if not path.exists() or file_sha256(path) != artifact.sha256:
        raise DataError(f"dataset file {artifact.path} is missing or changed since it was fetched")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ---------------------------------------------------------------- prompts


def format_prompt(tokenizer: Any, question: str, cfg: DataConfig) -> list[int]:
    content = f"{question} {cfg.instruction}".strip()
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(content)["input_ids"]]


@dataclass
class PromptBatch:
    indices: list[int]  # dataset row of each prompt
    prompt_ids: list[list[int]]
    answers: list[str]
    metas: list[dict[str, Any]]  # each row's other fields (a user reward's `meta`)


class PromptSet:
    """Tokenized prompts and a seeded order: iteration k takes the k-th slice of an endless
    sequence of per-epoch permutations, so any iteration's prompts follow from (seed, k) alone."""

    def __init__(self, rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        prompts = [format_prompt(tokenizer, r["question"], cfg) for r in rows]
        keep = [i for i, p in enumerate(prompts) if len(p) <= cfg.max_prompt_tokens]
        if not keep:
            raise DataError(f"no prompt fits data.max_prompt_tokens={cfg.max_prompt_tokens}")
        self.rows = [rows[i] for i in keep]
        self.prompts = [prompts[i] for i in keep]
        self.dropped = len(rows) - len(keep)

    def __len__(self) -> int:
        return len(self.rows)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.cfg.shuffle:
            return np.arange(len(self))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def batch(self, iteration: int, size: int) -> PromptBatch:
        n = len(self)
        idx, cache = [], {}
        for g in range(iteration * size, (iteration + 1) * size):
            epoch, pos = divmod(g, n)
            if epoch not in cache:
                cache[epoch] = self._order(epoch)
            idx.append(int(cache[epoch][pos]))
        return PromptBatch(
            indices=idx,
            prompt_ids=[self.prompts[i] for i in idx],
            answers=[self.rows[i]["answer"] for i in idx],
            metas=[dict(self.rows[i].get("meta") or {}) for i in idx],
        )


def sample_seed(base: int, iteration: int, index: int, per_step: int) -> int:
    """The sampling seed of sample `index` of `iteration`: distinct for every sample of the run
    and a function of (base seed, iteration, index) only, so a resumed run draws the same."""
    return base * 1_000_003 + iteration * per_step + index


# ---------------------------------------------------------------- answers and rewards

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,234.50 dollars' -> '1234.5'. None when `text` holds no number. Pure string work, so any
    length of digits (a model at temperature 1 writes "1,1,1,..." for pages) costs linear time and
    never overflows a decimal context."""
    m = _NUMBER.search(text)
    if not m:
        return None
    raw = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    negative = raw.startswith("-")
    whole, _, frac = raw.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    value = f"{whole}.{frac}" if frac else whole
    return value if not negative or value == "0" else "-" + value


def extract_gold(answer: str) -> str | None:
    """The gold number after the final '####' of a GSM8K answer."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(response: str) -> str | None:
    """The model's final number: after the last '####', else in the last \\boxed{}, else after
    'the answer is', else the last number in the text."""
    if "####" in response:
        tail = response.rsplit("####", 1)[1]
        got = normalize_number(tail.splitlines()[0] if tail.strip() else tail)
        if got is not None:
            return got
    boxed = _last_boxed(response)
    if boxed is not None and normalize_number(boxed) is not None:
        return normalize_number(boxed)
    m = re.findall(r"answer is[:\s]*([^\n]*)", response, flags=re.IGNORECASE)
    if m and normalize_number(m[-1]) is not None:
        return normalize_number(m[-1])
    nums = _NUMBER.findall(response)
    return normalize_number(nums[-1]) if nums else None


def gsm8k_reward(response: str, answer: str) -> float:
    """1.0 when the response's final number equals the gold one (both normalized), else 0.0; for any
    text, in linear time."""
    gold, got = extract_gold(answer), extract_answer(response)
    return 1.0 if gold is not None and gold == got else 0.0


def hash_reward(response_ids: Sequence[int]) -> float:
    """A deterministic pseudo-random 0/1 from the response tokens. A random-init model scores 0 on
    GSM8K everywhere, advantages vanish and the weights never move; this keeps the check honest."""
    return float(hashlib.sha256(np.asarray(response_ids, dtype=np.int64).tobytes()).digest()[0] & 1)
