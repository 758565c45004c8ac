"""Ray workers: trainer ranks and the rollout engine as actors, and `Workers`, the group one run
drives. `runtime_env` is the one place that decides what every worker process sees; each worker
reads its environment back and a worker missing a required variable stops the run before any
model is loaded."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import quiet, reaper
from .config import DETERMINISM_ENV, Perturbation, RunConfig, config_from_json
from .determinism import DeterminismError, apply_process_settings, env_problems, fa3_importable, fingerprint, read_env
from .megatron.parallel import tcp_store
from .rollout import Generation, SamplingParams, make_engine
from .selftest import batch_invariance, vocab_bound
from .tensor_hash import tensor_digests
from .trainer import GRPOTrainer, Sample

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# Inherited from the driver when set: offline switches, caches, and the host's NVLink-multicast
# guards (they must reach every process that opens NCCL).
PASSTHROUGH_ENV = (
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
    "NCCL_DEBUG",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "FLASHINFER_WORKSPACE_BASE",
    "SGLANG_DG_CACHE_DIR",
)
# Fault injection for the tests (set through resources.worker_env): a worker whose env has
# DETRL_HANG=<method> sleeps in that method until it is killed; DETRL_CRASH=<method> prints a message
# and exits there, as an engine that refuses to start does.
HANG_ENV, CRASH_ENV = "DETRL_HANG", "DETRL_CRASH"
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


class RunError(RuntimeError):
    pass


class WeightSyncError(RunError):
    """The engine does not hold exactly the weights the trainer sent."""


class WorkerStartError(RunError):
    """A worker (most often the rollout engine) died while starting; the message is its own."""


class PhaseTimeout(RuntimeError):
    """A phase did not finish in time (a hung engine, NCCL collective or worker); the run is stopped."""


# The JIT caches a worker fills (Triton kernels, torch inductor, flashinfer's compiled ops, DeepGEMM's
# kernels, which SGLang's deterministic GEMMs build per shape on Hopper), kept under the det-rl cache so
# run B, the next nightly and the Docker volume start warm. SGLang overwrites DG_JIT_CACHE_DIR with
# SGLANG_DG_CACHE_DIR (default ~/.cache/deep_gemm): both are set, and a user moves it with the latter.
# A compiled kernel is the same code whether built now or loaded: a warm cache changes no bit (cold and
# warm ledgers are compared in benchmarks/results).
COMPILE_CACHE_ENV = {
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
    "SGLANG_DG_CACHE_DIR": "deep_gemm",
    "DG_JIT_CACHE_DIR": "deep_gemm",
}


def runtime_env(cfg: RunConfig, role: str, compile_cache: str | None = None) -> dict[str, Any]:
    env: dict[str, str] = {
        "PYTHONHASHSEED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(cfg.resources.cpu_threads),
    }
    if cfg.determinism.enabled:
        env.update(cfg.determinism.env)
    if cfg.on_gpu and role == "trainer":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # fewer fragments beside SGLang
    if cfg.on_gpu and role == "trainer" and cfg.resources.tensor_parallel > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron: TP's async all-reduce is queued before the wgrad GEMM
    if compile_cache:
        env.update({key: str(Path(compile_cache) / sub) for key, sub in COMPILE_CACHE_ENV.items()})
    for key in PASSTHROUGH_ENV:  # the user's own settings win over ours
        if key in os.environ:
            env[key] = os.environ[key]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    for key, value in cfg.resources.worker_env.get(role, {}).items():  # type: ignore[call-overload]
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return {"env_vars": env}


def _process_info(role: str) -> dict[str, Any]:
    return {
        "role": role,
        "pid": os.getpid(),
        "env": read_env(list(DETERMINISM_ENV)),
        "fa3": fa3_importable(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
    }


def _need_paths(*paths: str) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"{missing} not found on node {socket.gethostname()}: on a Ray cluster the "
            "cache (--cache, DETRL_CACHE) must be on a filesystem every node mounts"
        )


def _maybe_hang(method: str) -> None:
    if os.environ.get(HANG_ENV) == method:
        while True:
            time.sleep(3600)
    if os.environ.get(CRASH_ENV) == method:
        print(f"RuntimeError: injected crash in {method} ({CRASH_ENV})", file=sys.stderr, flush=True)
        os._exit(1)


def worker_log_tail(pid: int | None, lines: int = 12) -> tuple[str | None, list[str]]:
    """The end of a local worker's stderr log (Ray's session logs), where an engine that died while
    starting leaves its own message. (None, []) when it is not on this machine."""
    node = getattr(ray._private.worker, "_global_node", None)  # no public API names the log dir
    if pid is None or node is None:
        return None, []
    files = sorted(Path(node.get_logs_dir_path()).glob(f"worker-*-{pid}.err"))
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


class TrainerWorker:
    def __init__(self, cfg_json: str, hf_dir: str, ckpt: str, rank: int, world_size: int):
        quiet.install()
        self.cfg = config_from_json(cfg_json)
        self.hf_dir, self.ckpt, self.rank, self.world_size = hf_dir, ckpt, rank, world_size
        self.role = f"trainer{rank}"
        self.trainer: GRPOTrainer | None = None
        self._store: Any = None
        self._ipc_bucket: Any = None  # the GPU buffer the engine loads from, kept until it has

    def env(self) -> dict[str, Any]:
        return _process_info(self.role)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and the port of the torch.distributed store it now holds open: the ranks'
        meeting point, on rank 0's node rather than the driver's. The OS picks the port while the store
        binds it, so no other process can take it between choosing and binding."""
        addr = ray.util.get_node_ip_address()
        self._store = tcp_store(addr, 0, self.world_size, is_master=True)
        return addr, self._store.port

    def import_weight_sync(self) -> None:
        from .rollout.sglang import import_weight_sync

        import_weight_sync()

    def setup(self, master_addr: str, master_port: int) -> None:
        _need_paths(self.hf_dir, self.ckpt)
        store = self._store or tcp_store(master_addr, master_port, self.world_size, is_master=False)
        apply_process_settings(self.cfg.determinism.enabled, self.cfg.seed, self.cfg.resources.cpu_threads)
        self.trainer = GRPOTrainer(
            self.cfg, self.hf_dir, self.ckpt, rank=self.rank, world_size=self.world_size, store=store
        )

    def fingerprint(self) -> dict[str, Any]:
        t = self._t
        return fingerprint(
            self.role, {"layout": {"dp": t.dp, "tp": t.tp, "pp": 1}, "dtype": t.dtype, "device": str(t.device)}
        )

    @property
    def _t(self) -> GRPOTrainer:
        assert self.trainer is not None, "setup() first"
        return self.trainer

    def train_step(self, samples: list[Sample], global_tokens: list[int]) -> Any:
        _maybe_hang("train_step")
        return self._t.train_step(samples, global_tokens)

    def export_hf(self, dtype: str) -> tuple[Any, dict[str, str] | None]:
        tensors = self._t.export_hf(dtype)
        if tensors is None:  # a TP rank other than 0: it took part in the gather
            return None, None
        return tensors, tensor_digests(tensors, self.cfg.ledger.tensor_hash)

    def export_ipc(
        self, dtype: str, pack: bool = True
    ) -> tuple[bytes | None, dict[str, str] | None, dict[str, str] | None]:
        """(CUDA IPC payload, ledger digests, the engine checksums they must produce) of the current
        weights; the payload stays valid until `release_ipc`. `pack=False`: no payload (a proof
        without an update needs only the checksums)."""
        from .rollout.sglang import expected_checksums, pack_for_ipc

        tensors = self._t.export_hf(dtype, device="cuda")
        if tensors is None:
            return None, None, None
        payload = None
        if pack:
            payload, self._ipc_bucket = pack_for_ipc(tensors)
        return payload, tensor_digests(tensors, self.cfg.ledger.tensor_hash), expected_checksums(tensors)

    def release_ipc(self) -> None:
        self._ipc_bucket = None

    def weight_hashes(self) -> dict[str, str] | None:
        return self._t.weight_hashes()

    def check(self, fn: Callable[[str, RunConfig], list[Any]]) -> list[dict[str, Any]]:
        """Run a check function in this worker's process (doctor's worker checks)."""
        return [asdict(c) for c in fn(self.role, self.cfg)]

    def flip_bit(self, tensor: str, index: int, bit: int) -> None:
        self._t.flip_bit(tensor, index, bit)

    def save_checkpoint(self, path: str) -> None:
        self._t.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self._t.load_checkpoint(path)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()


class RolloutWorker:
    def __init__(self, cfg_json: str, model_dir: str, schedule_args: dict[str, int] | None = None):
        quiet.install()
        self.cfg, self.model_dir = config_from_json(cfg_json), model_dir
        self.schedule_args = schedule_args
        self.engine: Any = None

    def env(self) -> dict[str, Any]:
        return _process_info("rollout")

    def setup(self) -> dict[str, Any]:
        _maybe_hang("setup")
        _need_paths(self.model_dir)
        apply_process_settings(self.cfg.determinism.enabled, self.cfg.seed, self.cfg.resources.cpu_threads)
        self.engine = make_engine(self.cfg, self.model_dir, self.schedule_args)
        return self.engine.info()

    def fingerprint(self) -> dict[str, Any]:
        # the schedule's batch limits are the run's schedule (in the header), not its environment
        info = {k: v for k, v in self.engine.info().items() if k != "schedule_args"}
        return fingerprint("rollout", {"engine": info})

    def generate(self, prompts: list[list[int]], seeds: list[int] | None, params: SamplingParams) -> list[Generation]:
        _maybe_hang("generate")
        return self.engine.generate(prompts, seeds, params)

    def check(self, fn: Callable[[str, RunConfig], list[Any]]) -> list[dict[str, Any]]:
        return [asdict(c) for c in fn("rollout", self.cfg)]

    def selftest(self, quick: bool = True) -> dict[str, Any]:
        res = batch_invariance(self.engine, quick=quick, vocab=vocab_bound(self.model_dir))
        return {"passed": res.passed, "unique": res.unique, "settings": res.settings}

    def sync(self, named_tensors: dict[str, Any], update: bool) -> list[str]:
        """Load the trainer's tensors (when `update`) and prove the engine holds exactly them."""
        if update:
            self.engine.update_weights(named_tensors)
        return self.engine.verify_weights(named_tensors)

    def sync_ipc(self, payload: bytes | None, expected: dict[str, str]) -> list[str]:
        """Load the trainer's bucket by its CUDA IPC handle (unless None) and compare the engine's
        checksums with the trainer's."""
        if payload is not None:
            self.engine.update_weights_ipc(payload)
        return self.engine.verify_checksums(expected)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


_RAY_LOCK = threading.Lock()
_ray_users = 0  # runs in this process using the local Ray that ensure_ray started (side-by-side runs share it)


def ensure_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster or start a local one. Returns whether the caller must
    `release_ray()` when done: the last run out of a Ray this process started shuts it down."""
    global _ray_users
    with _RAY_LOCK:
        if ray.is_initialized():
            if _ray_users:
                _ray_users += 1
                return True
            return False
        # "local": a fresh instance even when `ray start` left a cluster behind; joining one is explicit
        ray.init(
            address=cfg.resources.ray_address or "local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
            log_to_driver=True,
        )
        _ray_users = 1
    if not cfg.resources.ray_address:  # our own local Ray: stop it even if this process is killed
        node = getattr(ray._private.worker, "_global_node", None)  # no public API names the session dir
        if node is not None:
            reaper.start(node.get_session_dir_path())
    return True


@contextlib.contextmanager
def shared_ray(cfg: RunConfig) -> Iterator[None]:
    """Hold this process's Ray for runs started in other threads (side by side): Ray is started here,
    in the calling (main) thread, where it can install its signal handlers."""
    started = ensure_ray(cfg)
    try:
        yield
    finally:
        if started:
            release_ray()


def release_ray() -> None:
    global _ray_users
    with _RAY_LOCK:
        _ray_users -= 1
        if _ray_users <= 0:
            _ray_users = 0
            ray.shutdown()


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
    ):
        """`setup=False`: start the actors with their env and resources but load nothing (preflight).
        `schedule_args`: the engine's batch limits under a perturbed schedule (detrl.schedule)."""
        self.cfg, self.model_dir, self.ckpt_dir, self.setup = cfg, model_dir, ckpt_dir, setup
        self.schedule_args = dict(schedule_args or {})
        self.compile_cache = compile_cache
        self.trainers: list[Any] = []
        self.rollout: Any = None
        self.fingerprints: dict[str, Any] = {}
        self.engine_info: dict[str, Any] = {}
        self.placement: dict[str, Any] = {}
        self.env_readback: dict[str, Any] = {}
        self.startup_s: dict[str, float] = {}  # seconds per start-up part, for the ledger header
        self._started_ray = False
        self._pg: Any = None
        self._hung = False

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.startup_s[part] = round(time.perf_counter() - t, 2)

    # ------------------------------------------------------------------ the group's steps

    def wait(self, refs: Any, phase: str, iteration: int | None = None) -> Any:
        """ray.get with the phase's time limit; a timeout names the phase and stops the run."""
        limit = self.cfg.startup_timeout() if iteration is None else self.cfg.phase_timeout()
        try:
            return ray.get(refs, timeout=limit)
        except RayActorError as exc:
            role = self._role_of(exc)
            pid = self.placement.get(role, {}).get("pid") if role else None
            report = death_report(role, phase, pid)
            if iteration is None:  # start-up: a retry would meet the same refusal
                raise WorkerStartError(f"start-up: {report}") from exc
            exc.add_note(report)  # mid-run: stays retriable (the run resumes from its checkpoint)
            raise
        except GetTimeoutError:
            self._hung = True
            where = "start-up" if iteration is None else f"iteration {iteration}"
            key = "timeouts.startup_s" if iteration is None else "timeouts.phase_s"
            raise PhaseTimeout(
                f"{where}: the {phase} phase did not finish within {limit:.0f} s ({key}); a hung "
                "engine, NCCL collective or worker is the usual cause. The run's workers were "
                f"stopped; raise {key} if the phase is only slow"
            ) from None

    def _role_of(self, exc: RayActorError) -> str | None:
        dead = getattr(exc, "actor_id", None)
        for role, actor in [("rollout", self.rollout)] + [(f"trainer{r}", t) for r, t in enumerate(self.trainers)]:
            if actor is not None and actor._actor_id.hex() == dead:
                return role
        return None

    def selftest(self) -> dict[str, Any] | None:
        """The engine's batch-invariance self-test (determinism on); fails the run when it is not."""
        if not (self.cfg.determinism.enabled and self.cfg.determinism.selftest):
            return None
        with self._timed("selftest"):
            res = self.wait(self.rollout.selftest.remote(True), "engine self-test")
        if not res["passed"]:
            raise DeterminismError(
                f"the rollout engine is not batch-invariant ({res['unique']}: more than one unique "
                f"sample per mode): {self.engine_info}. Use a deterministic setting (sglang: "
                f"enable_deterministic_inference with flashinfer or triton; hf: batching=per_sequence)"
            )
        return res

    def flip_bit(self, p: Perturbation) -> None:
        ray.get([t.flip_bit.remote(p.tensor, p.index, p.bit) for t in self.trainers])

    def sync_policy(self, it: int, update: bool) -> dict[str, str]:
        """Send the trainer's weights to the engine (when `update`) and prove the engine holds exactly
        them. Returns the digest of every tensor sent."""
        tp, dtype = self.cfg.resources.tensor_parallel, self.engine_info["dtype"]
        if self.cfg.ipc_weight_sync:
            exported = self.wait([t.export_ipc.remote(dtype, update) for t in self.trainers[:tp]], "weight sync", it)
            payload, sent, expected = exported[0]
            bad = self.wait(self.rollout.sync_ipc.remote(payload, expected), "weight sync", it)
            self.wait(self.trainers[0].release_ipc.remote(), "weight sync", it)
        else:
            exports = [t.export_hf.options(num_returns=2).remote(dtype) for t in self.trainers[:tp]]
            tensors_ref, sent_ref = exports[0]
            bad = self.wait(self.rollout.sync.remote(tensors_ref, update), "weight sync", it)
            sent = self.wait(sent_ref, "weight sync", it)
            self.wait([ref for pair in exports[1:] for ref in pair], "weight sync", it)
        if bad:
            raise WeightSyncError(
                f"iteration {it}: the engine's weights differ from the trainer's in {len(bad)} tensor(s): {bad[:5]}"
            )
        return sent

    def generate(
        self, it: int, prompts: list[list[int]], seeds: list[int] | None, params: SamplingParams
    ) -> list[Generation]:
        return self.wait(self.rollout.generate.remote(prompts, seeds, params), "rollout", it)

    def train_step(self, it: int, samples: list[Sample]) -> tuple[list[np.ndarray], list[float], list[float]]:
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
            self._started_ray = ensure_ray(self.cfg)
        try:
            with self._timed("actors"):
                self._create()
            if self.setup:
                with self._timed("env_check"):
                    self._check_env()
                self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        addr, port = self.wait(self.trainers[0].rendezvous.remote(), "trainer rendezvous")
        if self.cfg.on_gpu and self.cfg.resources.colocate:
            # SGLang sizes its memory pool from what is free when it starts: start it first
            exporters = self.trainers[: self.cfg.resources.tensor_parallel] if self.cfg.ipc_weight_sync else []
            imports = [t.import_weight_sync.remote() for t in exporters]
            with self._timed("engine"):
                self.engine_info = self.wait(self.rollout.setup.remote(), "engine start")
            self.wait(imports, "trainer start")
            with self._timed("trainer"):
                self.wait([t.setup.remote(addr, port) for t in self.trainers], "trainer start")
        else:
            with self._timed("engine_and_trainer"):
                setups = [t.setup.remote(addr, port) for t in self.trainers] + [self.rollout.setup.remote()]
                self.engine_info = self.wait(setups, "worker start")[-1]
        with self._timed("fingerprint"):
            fps = self.wait(
                [t.fingerprint.remote() for t in self.trainers] + [self.rollout.fingerprint.remote()], "fingerprint"
            )
        self.fingerprints = {fp["role"]: fp for fp in fps}

    def _create(self) -> None:
        """One actor per trainer rank and one rollout actor. On GPUs, and on any cluster, the
        trainers take placement-group bundles (PACK: one node while it fits, then the next)."""
        cfg, res = self.cfg, self.cfg.resources
        cfg_json = json.dumps(cfg.model_dump(mode="json"))
        world = res.trainer_ranks
        trainer_cls, rollout_cls = ray.remote(TrainerWorker), ray.remote(RolloutWorker)
        t_env, r_env = (runtime_env(cfg, role, self.compile_cache) for role in ("trainer", "rollout"))
        args = (cfg_json, self.model_dir, self.ckpt_dir)
        rollout_args = (cfg_json, self.model_dir, self.schedule_args)
        if not cfg.on_gpu and not res.ray_address:
            # num_cpus=0: long-lived actors that size their own threads; a 1-core host still fits both
            self.trainers = [
                trainer_cls.options(num_cpus=0, runtime_env=t_env).remote(*args, r, world) for r in range(world)
            ]
            self.rollout = rollout_cls.options(num_cpus=0, runtime_env=r_env).remote(
                cfg_json, self.model_dir, self.schedule_args
            )
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
            self.rollout = rollout_cls.options(num_cpus=0, runtime_env=r_env).remote(
                cfg_json, self.model_dir, self.schedule_args
            )
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
        if not self.cfg.determinism.enabled:
            return
        problems = [p for i in infos for p in env_problems(i["env"], self.cfg.determinism.env, i["role"])]
        fa3 = [
            f"{i['role']}: FlashAttention-3 is importable ({i['fa3']}); remove it: pip uninstall -y flash_attn_3"
            for i in infos
            if i["fa3"]
        ]
        if fa3:
            raise DeterminismError(
                "determinism is on but FA3 is installed where the run would use it:\n  " + "\n  ".join(fa3)
            )
        if problems:
            raise DeterminismError(
                "determinism is on but workers lack required settings:\n  "
                + "\n  ".join(problems)
                + "\ndet-rl passes them through the Ray runtime_env "
                "unless resources.worker_env removes one; on a cluster, export them on every node"
            )

    def __exit__(self, *exc: Any) -> None:
        actors = [a for a in [*self.trainers, self.rollout] if a is not None]
        try:  # a hung actor runs no close() before its hung call returns: kill it at once
            ray.get([a.close.remote() for a in actors], timeout=5 if self._hung else 120)
        except Exception:
            pass
        for a in actors:
            ray.kill(a)
        if self._pg is not None:
            remove_placement_group(self._pg)
        self.trainers, self.rollout = [], None
        if self._started_ray:
            release_ray()
