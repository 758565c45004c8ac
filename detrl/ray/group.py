"""`Workers`: the actors of one run (one trainer per rank and the rollout engine) and what the loop asks
of them as a group. Every call waits with its phase's time limit; a worker that dies is reported with
the end of its own log."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .. import timeouts, weight_sync
from ..config import RunConfig
from ..determinism import DeterminismError
from ..plant import Perturbation
from ..rollout import Generation, SamplingParams
from . import env as worker_env
from . import faults, session
from .errors import PhaseTimeout, RunError, WeightSyncError, WorkerDied, WorkerStartError
from .rollout_actor import RolloutActor
from .trainer_actor import TrainerActor

# What an engine's own start-up error says -> the fix
DEATH_HINTS = (
    (
        ("KV cache", "mem-fraction-static", "mem_fraction_static", "out of memory", "OutOfMemory"),
        "the GPU memory did not fit: another process (a second run on the same GPU?) held part of it, or "
        "rollout.sglang.mem_fraction_static is too low for the weights; run the two runs one after the other "
        "(resources.twice=sequential) or change mem_fraction_static",
    ),
    (("No module named",), "a package is missing in the worker's environment: install it on every node"),
)


def worker_log_tail(pid: int | None, lines: int = 12) -> tuple[str | None, list[str]]:
    """The end of a local worker's stderr log (Ray's session logs), where an engine that died while
    starting leaves its own message. (None, []) when it is not on this machine."""
    logs = session.logs_dir()
    if pid is None or logs is None:
        return None, []
    files = sorted(logs.glob(f"worker-*-{pid}.err"))
    if not files:
        return None, []
    text = files[-1].read_text(errors="replace").splitlines()
    useful = [x for x in text if x.strip() and not x.startswith(("  warnings.warn", "[rank"))]
    return str(files[-1]), useful[-lines:]


def death_report(role: str | None, phase: str, pid: int | None) -> str:
    path, tail = worker_log_tail(pid)
    errors = [x for x in tail if "Error" in x or "error" in x] or tail[-3:]
    msg = f"{f'the {role}' if role else 'a'} worker died during {phase}"
    if errors:
        msg += ": " + " | ".join(x.strip() for x in errors[-3:])
    fixes = [fix for keys, fix in DEATH_HINTS if any(k in x for x in tail for k in keys)]
    if fixes:
        msg += ". Fix: " + "; ".join(fixes)
    return msg + (f" (its log: {path})" if path else " (its log is on the node that ran it)")


# How often a wait looks for a worker process that is gone: Ray notices a dead worker only when every
# process holding its connection has exited, and Megatron's checkpoint writers are forked children of it
POLL_S = 2.0


def process_alive(pid: int) -> bool:
    """Whether process `pid` on this machine still runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)  # PermissionError: it exists, under another user
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def shard(samples: Sequence[Any], updates: int, ranks: int) -> list[list[Any]]:
    """Rank r gets the r-th contiguous slice of every mini-batch."""
    per_update = len(samples) // updates
    k = per_update // ranks
    return [
        [s for u in range(updates) for s in samples[u * per_update + r * k : u * per_update + (r + 1) * k]]
        for r in range(ranks)
    ]


def unshard(parts: Sequence[Sequence[Any]], updates: int) -> list[Any]:
    k = len(parts[0]) // updates
    return [x for u in range(updates) for part in parts for x in part[u * k : (u + 1) * k]]


class Workers:
    """The actors of one run, `trainers` (one per rank) and `rollout`, and what the loop asks of them
    as a group. Every call waits with its phase's time limit (`wait`)."""

    def __init__(
        self,
        cfg: RunConfig,
        model_dir: str,
        ckpt_dir: str,
        *,
        setup: bool = True,
        compile_cache: str | None = None,
        schedule_args: dict[str, int] | None = None,
        before_load: Callable[[], Any] | None = None,
    ):
        """`setup=False`: start the actors with their env and resources but load nothing (preflight).
        `schedule_args`: the engine's batch limits under a perturbed schedule (detrl.schedule).
        `before_load`: waited for before the trainers read `ckpt_dir`, once the engine has started (the
        conversion that writes it, still running: detrl.artifacts.Converting)."""
        self.cfg, self.model_dir, self.ckpt_dir, self.setup = cfg, model_dir, ckpt_dir, setup
        self.before_load = before_load
        self.schedule_args = dict(schedule_args or {})
        self.compile_cache = compile_cache
        self.transport = weight_sync.transport_for(cfg)
        self.trainers: list[Any] = []
        self.rollout: Any = None
        self.fingerprints: dict[str, Any] = {}
        self.engine_info: dict[str, Any] = {}
        self.placement: dict[str, Any] = {}
        self.env_readback: dict[str, Any] = {}
        self.startup_s: dict[str, float] = {}  # seconds per start-up part, for the ledger header
        self._started_ray = False
        self._pg: Any = None
        self._lost = False  # a worker hung or died: its peers' calls may never end, so their close() may not run
        self._prepared: Any = None  # the rollout actor's `prepare` call
        self._selftest: Any = None  # the rollout actor's self-test, started once its engine is up

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.startup_s[part] = round(time.perf_counter() - t, 2)

    # ------------------------------------------------------------------ the group's steps

    def wait(self, refs: Any, phase: str, iteration: int | None = None) -> Any:
        """ray.get with the phase's time limit; a timeout names the phase and stops the run, and a worker
        whose process is gone is reported within POLL_S, whether or not Ray has noticed."""
        limit = timeouts.startup(self.cfg) if iteration is None else timeouts.phase(self.cfg)
        deadline = time.monotonic() + limit
        try:
            while True:
                try:
                    return ray.get(refs, timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
                except GetTimeoutError:
                    if time.monotonic() >= deadline:
                        raise
                    self._raise_if_a_worker_is_gone(phase, iteration)
        except RayActorError as exc:
            self._lost = True  # its peers may wait in a collective with it
            role = self._role_of(exc)
            pid = self.placement.get(role, {}).get("pid") if role else None
            report = death_report(role, phase, pid)
            if iteration is None:  # start-up: a retry would meet the same refusal
                raise WorkerStartError(f"start-up: {report}") from exc
            exc.add_note(report)  # mid-run: stays retriable (the run resumes from its checkpoint)
            raise
        except GetTimeoutError:
            self._lost = True
            where = "start-up" if iteration is None else f"iteration {iteration}"
            key = "timeouts.startup_s" if iteration is None else "timeouts.phase_s"
            raise PhaseTimeout(
                f"{where}: the {phase} phase did not finish within {limit:.0f} s ({key}); a hung "
                "engine, NCCL collective or worker is the usual cause. The run's workers were "
                f"stopped; raise {key} if the phase is only slow"
            ) from None

    def _raise_if_a_worker_is_gone(self, phase: str, iteration: int | None) -> None:
        """Report a worker of this machine whose process has exited, as Ray would report its death."""
        here = ray.get_runtime_context().get_node_id()
        for role, where in self.placement.items():
            if where.get("node_id") == here and where.get("pid") and not process_alive(where["pid"]):
                self._lost = True  # its actor cannot answer close()
                report = death_report(role, phase, where["pid"])
                if iteration is None:
                    raise WorkerStartError(f"start-up: {report}")
                raise WorkerDied(f"iteration {iteration}: {report}")

    def _role_of(self, exc: RayActorError) -> str | None:
        dead = getattr(exc, "actor_id", None)
        for role, actor in [("rollout", self.rollout)] + [(f"trainer{r}", t) for r, t in enumerate(self.trainers)]:
            if actor is not None and actor._actor_id.hex() == dead:
                return role
        return None

    def _wants_selftest(self) -> bool:
        return self.cfg.determinism.enabled and self.cfg.determinism.selftest

    def selftest(self) -> dict[str, Any] | None:
        """The engine's batch-invariance self-test (determinism on); fails the run when it is not. The start
        queues it on the rollout actor as soon as the engine is up, so it runs while the trainers set up;
        its start-up part is the wait that remains after them."""
        if not self._wants_selftest():
            return None
        ref, self._selftest = self._selftest, None
        with self._timed("selftest"):
            res = self.wait(ref if ref is not None else self.rollout.selftest.remote(True), "engine self-test")
        if not res["passed"]:
            raise DeterminismError(
                f"the rollout engine is not batch-invariant ({res['unique']}: more than one unique "
                f"sample per mode): {self.engine_info}. Use a deterministic setting (sglang: "
                f"enable_deterministic_inference with flashinfer or triton; hf: batching=per_sequence)"
            )
        return res

    def flip_bit(self, p: Perturbation) -> None:
        ray.get([t.flip_bit.remote(p.tensor, p.index, p.bit) for t in self.trainers])

    def sync_policy(self, it: int, update: bool) -> tuple[dict[str, str], dict[str, float]]:
        """Send the trainer's weights to the engine (when `update`) over the run's transport
        (detrl.weight_sync) and prove the engine holds exactly them. Returns the digest of every tensor
        sent, and the seconds of the export and of the load (`weight_sync.sync`)."""
        sent, bad, parts = weight_sync.sync(self, self.transport, it, update)
        if bad:
            raise WeightSyncError(
                f"iteration {it}: the engine's weights differ from the trainer's in {len(bad)} tensor(s): {bad[:5]}"
            )
        return sent, parts

    def generate(
        self, it: int, prompts: list[list[int]], seeds: list[int] | None, params: SamplingParams
    ) -> list[Generation]:
        return self.wait(self.rollout.generate.remote(prompts, seeds, params), "rollout", it)

    def train_step(self, it: int, samples: list[Any]) -> tuple[list[np.ndarray], list[float], list[float]]:
        """One step over the batch: (trainer log-probs per sample, losses, grad norms per update).
        Rank = dp_rank * tp + tp_rank: every TP rank of a replica gets its shard, the first reports."""
        updates, tp = self.cfg.train.updates_per_step, self.cfg.resources.tensor_parallel
        per_update = len(samples) // updates
        global_tokens = [
            sum(len(s.response_ids) for s in samples[u * per_update : (u + 1) * per_update]) for u in range(updates)
        ]
        shards = shard(samples, updates, self.cfg.data_parallel)
        results = self.wait(
            [t.train_step.remote(shards[r // tp], global_tokens) for r, t in enumerate(self.trainers)], "train", it
        )[::tp]
        return unshard([r.logprobs for r in results], updates), results[0].losses, results[0].grad_norms

    def weight_hashes(self, it: int) -> dict[str, str]:
        """The trainer's weights by tensor; every data-parallel replica must hold the same."""
        tp = self.cfg.resources.tensor_parallel
        hashes = self.wait([t.weight_hashes.remote() for t in self.trainers], "weight hash", it)[::tp]
        for d, h in enumerate(hashes[1:], 1):
            if h != hashes[0]:
                diff = sorted(n for n in h if h[n] != hashes[0].get(n))
                raise RunError(
                    f"iteration {it}: data-parallel replica {d} (trainer rank {d * tp}) "
                    f"weights differ from replica 0 in {diff[:5]}"
                )
        return hashes[0]

    def save_checkpoint(self, it: int, path: str) -> None:
        self.wait([t.save_checkpoint.remote(path) for t in self.trainers], "checkpoint", it)

    def load_checkpoint(self, path: str) -> None:
        self.wait([t.load_checkpoint.remote(path) for t in self.trainers], "checkpoint load")

    def check(self, fn: Callable[[str, RunConfig], list[Any]]) -> list[dict[str, Any]]:
        """`fn(role, cfg)` inside every worker process (see doctor)."""
        parts = self.wait([a.check.remote(fn) for a in [*self.trainers, self.rollout]], "worker checks")
        return [c for part in parts for c in part]

    # ------------------------------------------------------------------ start and stop

    def __enter__(self) -> Workers:
        with self._timed("ray"):
            self._started_ray = session.ensure_ray(self.cfg)
        try:
            with self._timed("actors"):
                self._create()
            if self.setup:
                # first in the rollout actor's queue: the engine's processes import SGLang meanwhile
                self._prepared = self.rollout.prepare.remote()
                with self._timed("env_check"):
                    self._check_env()
                self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        self.wait(self._prepared, "engine start")  # its error, if any, before the engine's start
        if self.cfg.on_gpu and self.cfg.resources.colocate:
            # SGLang sizes its memory pool from what is free when it starts: start it first, while rank 0
            # opens the store and the trainers import Megatron and the weight-sync transport
            engine = self.rollout.setup.remote()
            meet = self.trainers[0].rendezvous.remote()
            imports = [t.preload.remote(self.transport) for t in self.trainers]
            with self._timed("engine"):
                self.engine_info = self.wait(engine, "engine start")
            rollout_fp = self._queue_after_engine()
            self._await_checkpoint()
            addr, port = self.wait(meet, "trainer rendezvous")
            self.wait(imports, "trainer start")
            with self._timed("trainer"):
                self.wait([t.setup.remote(addr, port) for t in self.trainers], "trainer start")
        else:
            addr, port = self.wait(self.trainers[0].rendezvous.remote(), "trainer rendezvous")
            with self._timed("engine_and_trainer"):
                engine = self.rollout.setup.remote()
                self._await_checkpoint()
                setups = [t.setup.remote(addr, port) for t in self.trainers] + [engine]
                self.engine_info = self.wait(setups, "worker start")[-1]
            rollout_fp = self._queue_after_engine()
        with self._timed("fingerprint"):
            fps = self.wait([t.fingerprint.remote() for t in self.trainers] + [rollout_fp], "fingerprint")
        self.fingerprints = {fp["role"]: fp for fp in fps}
        weight_sync.warm(self, self.transport)

    def _queue_after_engine(self) -> Any:
        """Once the engine is up, start the rollout actor's fingerprint, then its self-test, and return the
        fingerprint's reference: on one GPU the self-test then runs while the trainers load the checkpoint
        (nothing of the trainers' reaches the engine, whose memory pool was sized as it started). Never
        before the engine's start has succeeded: a call queued behind a failed start would fail too, and
        Ray logs the error of a reference nobody reads."""
        fingerprint = self.rollout.fingerprint.remote()
        if self._wants_selftest():
            self._selftest = self.rollout.selftest.remote(True)
        return fingerprint

    def _await_checkpoint(self) -> None:
        if self.before_load is not None:
            with self._timed("conversion"):  # the wait only: the conversion ran beside the start
                self.before_load()

    def _create(self) -> None:
        """One actor per trainer rank and one rollout actor. On GPUs, and on any cluster, the
        trainers take placement-group bundles (PACK: one node while it fits, then the next)."""
        cfg, res = self.cfg, self.cfg.resources
        cfg_json = json.dumps(cfg.model_dump(mode="json"))
        world = res.trainer_ranks
        t_env, r_env = (worker_env.runtime_env(cfg, role, self.compile_cache) for role in ("trainer", "rollout"))
        trainer_cls: Any = ray.remote(faults.inject(TrainerActor, t_env["env_vars"]))
        rollout_cls: Any = ray.remote(faults.inject(RolloutActor, r_env["env_vars"]))
        args = (cfg_json, self.model_dir, self.ckpt_dir)
        rollout_args = (cfg_json, self.model_dir, self.schedule_args)
        if not cfg.on_gpu and not res.ray_address:
            # num_cpus=0: long-lived actors that size their own threads; a 1-core host still fits both
            self.trainers = [
                trainer_cls.options(num_cpus=0, runtime_env=t_env).remote(*args, r, world) for r in range(world)
            ]
            self.rollout = rollout_cls.options(num_cpus=0, runtime_env=r_env).remote(*rollout_args)
            return
        if cfg.on_gpu:
            bundles = [{"GPU": res.gpu_share, "CPU": 1}] * (world if res.colocate else world + 1)
        else:
            bundles = [{"CPU": 1}] * world
        self._pg = placement_group(bundles, strategy="PACK")
        ray.get(self._pg.ready(), timeout=600)

        def on(bundle: int) -> Any:
            return PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=bundle)

        if not cfg.on_gpu:
            self.trainers = [
                trainer_cls.options(num_cpus=1, runtime_env=t_env, scheduling_strategy=on(r)).remote(*args, r, world)
                for r in range(world)
            ]
            self.rollout = rollout_cls.options(num_cpus=0, runtime_env=r_env).remote(*rollout_args)
            return
        share = res.gpu_share / 2 if res.colocate else res.gpu_share
        self.trainers = [
            trainer_cls.options(
                num_cpus=0,
                num_gpus=share if (res.colocate and r == 0) else res.gpu_share,
                runtime_env=t_env,
                scheduling_strategy=on(r),
            ).remote(*args, r, world)
            for r in range(world)
        ]
        self.rollout = rollout_cls.options(
            num_cpus=0, num_gpus=share, runtime_env=r_env, scheduling_strategy=on(0 if res.colocate else world)
        ).remote(*rollout_args)

    def _check_env(self) -> None:
        infos = self.wait([a.env.remote() for a in [*self.trainers, self.rollout]], "worker env check")
        self.env_readback = {i["role"]: i["env"] for i in infos}
        self.placement = {
            i["role"]: {k: i[k] for k in ("node_ip", "node_id", "pid", "cuda_visible_devices")} for i in infos
        }
        worker_env.refuse(
            [p for i in infos for p in worker_env.determinism_problems(i["role"], i["env"], i["fa3"], self.cfg)]
        )

    def __exit__(self, *exc: Any) -> None:
        actors = [a for a in [*self.trainers, self.rollout] if a is not None]
        # every close() ends, or its time is up, before any kill: a ray.get would raise at a dead worker's, and
        # the kill would then cut the others' short (the engine's shutdown, its temp folder). After a hang or
        # a death (`_lost`) the time is short: an actor whose call waits on the lost one runs no close()
        try:
            closing = [a.close.remote() for a in actors]
            ray.wait(closing, num_returns=len(closing), timeout=5 if self._lost else 120)
        except Exception:
            pass
        for a in actors:
            ray.kill(a)
        if self._pg is not None:
            remove_placement_group(self._pg)
        self.trainers, self.rollout = [], None
        if self._started_ray:
            session.release_ray()
