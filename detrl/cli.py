"""`detrl` command line: run, reproduce (run twice + verify), verify, doctor, selftest, eval, golden, profiles.

Each command imports what it uses when it runs: torch, Ray and Megatron take seconds to import, and
`detrl verify`, `detrl profiles` and a config error must not wait for them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .config import PROFILES, ConfigError, load_config
from .plant import parse_plants
from .resolve import resolve
from .util import default_dir

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# not 1: a CI reading 1 as "nondeterminism found" must never get it from a crash
EXIT_RUN_FAILED = 3


def emit(text: str) -> None:
    """print, except that a reader who closed the pipe (`detrl verify A B | head -1`) is no error: the rest of
    the output goes nowhere and the command still exits with its own code."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help=f"named profile: {', '.join(PROFILES)}")
    p.add_argument("--config", help="a YAML file of config keys (applied after the profile)")
    p.add_argument("--seed", type=int, help="the run seed (data order, sampling, init)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set rollout.temperature=0.7 (repeatable)",
    )
    p.add_argument("--cache", default=default_dir("cache"), help="where downloads and conversions are cached")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="rebuild this config's cache entries (model, dataset, conversion) instead of using them",
    )
    p.add_argument(
        "--plant",
        action="append",
        default=[],
        metavar="ITER:TENSOR[:before_step|after_step]",
        help="flip one bit of a trainer weight at an iteration, to prove the verifier catches it",
    )


def _load(args: argparse.Namespace, *, check: bool = True):
    if args.profile is None and args.config is None:
        raise ConfigError("give --profile NAME or --config FILE (profiles: auto, " + ", ".join(PROFILES) + ")")
    cfg, why = resolve(args.profile, config_file=args.config, overrides=args.overrides, seed=args.seed)
    if why:
        emit(why)
    if getattr(args, "cache", None):
        from .rundir import check_cache_dir

        check_cache_dir(args.cache)
    if check:
        from .doctor import check_resources

        check_resources(cfg)
    return cfg


def _plants(items: Sequence[str], cfg: Any):
    return parse_plants(list(items), cfg)


def _progress(label: str):
    from .records import progress_line

    def show(it: int, n: int, stats: dict[str, Any]) -> None:
        emit(f"[{label}] iteration {it + 1}/{n}: {progress_line(stats)}")

    return show


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    plants = _plants(args.plant, cfg)  # bad input is refused before the heavy imports
    from .loop import prepare, run
    from .rundir import check_out_dir

    check_out_dir(args.out, cfg, resume=args.resume)
    arts = prepare(cfg, args.cache, refresh=args.refresh)
    summary = run(
        cfg, args.out, arts, resume=args.resume, perturbations=plants, progress=_progress(Path(args.out).name)
    )
    emit(
        f"ledger: {Path(args.out) / 'ledger.jsonl'} ({summary.iterations} iterations, "
        f"{summary.wall_s:.1f}s, final weights {summary.final_weights[:16]})"
    )
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    cfg = _load(args)
    plants = _plants(args.plant, cfg)
    from concurrent.futures import ThreadPoolExecutor

    from . import artifacts, schedule, twice
    from .loop import run
    from .ray.session import shared_ray
    from .report import format_text
    from .rollout import attention_ahead
    from .rundir import check_out_dir
    from .verify import verify

    out = check_out_dir(args.out)
    twice.choose(cfg)  # a schedule this machine cannot hold stops here, before any download
    # as the flow does: the downloads run in threads while this one starts Ray (here, for its signal
    # handlers), held for both runs, and the runs start their workers while the conversion and the
    # engines' attention module build
    cache, refresh = args.cache, args.refresh
    compile_cache = artifacts.compile_cache_dir(cache)
    with ThreadPoolExecutor(3, thread_name_prefix="detrl-prepare") as pool:
        model_f = pool.submit(artifacts.model, cfg, cache, refresh)
        data_f = pool.submit(artifacts.dataset, cfg, cache, refresh)
        with shared_ray(cfg):
            model = model_f.result()
            megatron_f = pool.submit(artifacts.megatron, model, cache, refresh)
            kernels_f = pool.submit(attention_ahead.build, cfg, model.path, compile_cache)
            kernels_f.add_done_callback(lambda f: emit("\n".join(r.text() for r in f.result())))
            megatron = artifacts.converting(model, cache, megatron_f.result)
            arts = artifacts.Artifacts(model, data_f.result(), megatron, compile_cache)
            mode, why = twice.choose(cfg, model_dir=arts.model.path)
            emit(f"runs A and B: {mode.replace('_', ' ')} ({why})")
            rcfg = twice.run_config(cfg, mode)
            run_b = schedule.for_run(cfg, "B")
            emit(f"run B's schedule: {run_b.describe()}")
            twice.run_both(
                lambda: run(rcfg, out / "run_a", arts, progress=_progress("run A")),
                lambda: run(
                    rcfg, out / "run_b", arts, perturbations=plants, progress=_progress("run B"), schedule=run_b
                ),
                mode,
            )
    verdict = verify(str(out / "run_a"), str(out / "run_b"))
    emit(verdict.to_json() if args.json else format_text(verdict))
    return verdict.exit_code


def cmd_verify(args: argparse.Namespace) -> int:
    from .report import format_markdown, format_text
    from .verify import verify

    verdict = verify(args.a, args.b)
    if args.json:
        emit(verdict.to_json())
    elif args.markdown:
        emit(format_markdown(verdict))
    else:
        emit(format_text(verdict))
    return verdict.exit_code


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    report = doctor.run(_load(args, check=False))
    emit(report.table())
    bad = report.failures()
    emit(f"\n{len(report.checks) - len(bad)} passed, {len(bad)} failed")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_selftest(args: argparse.Namespace) -> int:
    from .models import fetch_model
    from .rollout import make_engine
    from .selftest import batch_invariance, vocab_bound

    cfg = _load(args)
    model = fetch_model(cfg.model, args.cache, device="cuda" if cfg.on_gpu else "cpu")
    engine = make_engine(cfg, model.path)
    try:
        res = batch_invariance(engine, quick=not args.full, vocab=vocab_bound(model.path))
    finally:
        engine.shutdown()
    emit(f"engine: {engine.info() if hasattr(engine, 'info') else cfg.backends.rollout}")
    emit("\n".join(res.lines()))
    return EXIT_OK if res.passed else EXIT_FAILED


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_checkpoint

    res = evaluate_checkpoint(args.run, args.cache, args.checkpoint)
    emit(res.text())
    return EXIT_FAILED if res.matches is False else EXIT_OK


def cmd_golden(args: argparse.Namespace) -> int:
    from . import golden

    res = golden.check(args.run, args.store, update=args.update)
    emit(res.text())
    return EXIT_OK if res.ok else EXIT_FAILED


def cmd_profiles(args: argparse.Namespace) -> int:
    for name in PROFILES:
        cfg = load_config(name)
        emit(
            f"{name}: model {cfg.model.source}:{cfg.model.name}, data {cfg.data.source}:{cfg.data.name}, "
            f"{cfg.rollout.prompts_per_step}x{cfg.rollout.samples_per_prompt} samples, "
            f"{cfg.rollout.max_new_tokens} new tokens, {cfg.train.steps} steps, rollout {cfg.backends.rollout}, "
            f"{'GPU' if cfg.on_gpu else 'CPU'}"
        )
    if args.show:
        emit(json.dumps(load_config(args.show).model_dump(mode="json"), indent=1))
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are det-rl's bad input: `main` prints them as `detrl: error: ...` with exit 2,
    in-process as from the shell, instead of argparse's exit from inside the parser."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if "expected one argument" in message:
            hint = "; a value that starts with '-' goes after '=' (e.g. --plant=-1:NAME)"
        raise ConfigError(f"{self.prog}: {message}{hint} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="detrl", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the GRPO loop once and write DIR/ledger.jsonl")
    config_arguments(p)
    p.add_argument("--out", required=True, help="run directory (must not hold a ledger yet, unless --resume)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out from its last checkpoint (checkpoint.every), or from its "
        "start when it has none; recorded iterations are recomputed and must match (exit 1 otherwise)",
    )
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("reproduce", help="run the loop twice (OUT/run_a, OUT/run_b) and verify")
    config_arguments(p)
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_reproduce)
    p = sub.add_parser(
        "verify",
        help="compare two run directories: exit 0 identical, 1 diverged, 2 nothing certified (a ledger "
        "incomplete or invalid, the same run twice, or the same hashes from different experiments)",
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("doctor", help="preflight: can this config run deterministically here? exit 0 all pass")
    config_arguments(p)
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("selftest", help="batch-invariance self-test of the configured engine (Unique samples: N)")
    config_arguments(p)
    p.add_argument("--full", action="store_true", help="batches up to 16 and longer generations")
    p.set_defaults(fn=cmd_selftest)

    p = sub.add_parser(
        "eval", help="the held-out eval of a run's checkpoint; exit 1 if it differs from the run's own eval"
    )
    p.add_argument("run")
    p.add_argument("--checkpoint", type=int, metavar="ITER", help="the checkpoint after ITER (default: the latest)")
    p.add_argument("--cache", default=default_dir("cache"), help="where the run's model and data are cached")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("golden", help="compare a run with the known-good ledger of its config (record it if none)")
    p.add_argument("run")
    p.add_argument("--store", default=default_dir("golden"))
    p.add_argument("--update", action="store_true", help="make this run the known-good ledger")
    p.set_defaults(fn=cmd_golden)
    p = sub.add_parser("profiles", help="list the named profiles")
    p.add_argument("--show", metavar="NAME", help="print one profile's full config")
    p.set_defaults(fn=cmd_profiles)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from . import quiet

    quiet.install()
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except ConfigError as exc:
        print(f"detrl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # stdout closed outside emit(): quiet, like a completed command
        return EXIT_OK
    except Exception as exc:
        from .data import DataError
        from .determinism import DeterminismError
        from .models import ModelError
        from .ray.errors import PhaseTimeout, RunError, WorkerDied
        from .util import CacheError

        if isinstance(exc, (DataError, ModelError, CacheError)):
            print(f"detrl: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        from .checkpoints import ResumeDivergence

        if isinstance(exc, ResumeDivergence):  # a resumed run that did not reproduce its own records
            print(f"detrl: DIVERGED: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, (DeterminismError, RunError, PhaseTimeout, WorkerDied)):
            print(f"detrl: error: {exc}", file=sys.stderr)
            return EXIT_RUN_FAILED
        import traceback

        traceback.print_exc()
        print(f"detrl: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
