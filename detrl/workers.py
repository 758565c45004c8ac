"""Ray workers: trainer ranks and the rollout engine as actors. `runtime_env` is the one place
that decides what every worker process sees; each worker reads its environment back and a worker
missing a required variable stops the run before any model is loaded."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from . import quiet, twice
from .config import DETERMINISM_ENV, RunConfig, config_from_json
from .determinism import DeterminismError, env_problems

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# Inherited from the driver when set: offline switches, caches, and the host's NVLink-multicast
# guards (they must reach every process that opens NCCL).
PASSTHROUGH_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                   "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                   "NCCL_DEBUG", "CUDA_DEVICE_MAX_CONNECTIONS", "TRITON_CACHE_DIR")


def runtime_env(cfg: RunConfig, role: str) -> dict[str, Any]:
    env: dict[str, str] = {"PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false",
                           "OMP_NUM_THREADS": str(cfg.resources.cpu_threads)}
    if cfg.determinism.enabled:
        env.update(cfg.determinism.env)
    if cfg.on_gpu and role == "trainer":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # fewer fragments beside SGLang
    if cfg.on_gpu and role == "trainer" and cfg.resources.tensor_parallel > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron: TP's async all-reduce is queued before the wgrad GEMM
    for key in PASSTHROUGH_ENV:
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
    import ray

    from .determinism import fa3_importable, read_env

    keys = list(DETERMINISM_ENV)
    return {"role": role, "pid": os.getpid(), "env": read_env(keys), "fa3": fa3_importable(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def _need_paths(*paths: str) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        import socket

        raise FileNotFoundError(f"{missing} not found on node {socket.gethostname()}: on a Ray cluster the "
                                "cache (--cache, DETRL_CACHE) must be on a filesystem every node mounts")


class TrainerWorker:
    def __init__(self, cfg_json: str, hf_dir: str, ckpt: str, rank: int, world_size: int):
        quiet.install()
        self.args = (cfg_json, hf_dir, ckpt, rank, world_size)
        self.trainer = None
        self._store = None

    def env(self) -> dict[str, Any]:
        return _process_info(f"trainer{self.args[3]}")

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and the port of the torch.distributed store it now holds open: the ranks'
        meeting point, on rank 0's node rather than the driver's. The OS picks the port while the store
        binds it, so no other process can take it between choosing and binding."""
        import ray

        from .convert import tcp_store

        addr = ray.util.get_node_ip_address()
        self._store = tcp_store(addr, 0, self.args[4], is_master=True)
        return addr, self._store.port

    def setup(self, master_addr: str, master_port: int) -> None:
        from .convert import tcp_store
        from .determinism import apply_process_settings
        from .trainer import GRPOTrainer

        cfg_json, hf_dir, ckpt, rank, world = self.args
        _need_paths(hf_dir, ckpt)
        store = self._store or tcp_store(master_addr, master_port, world, is_master=False)
        cfg = config_from_json(cfg_json)
        apply_process_settings(cfg.determinism.enabled, cfg.seed, cfg.resources.cpu_threads)
        self.trainer = GRPOTrainer(cfg, hf_dir, ckpt, rank=rank, world_size=world, store=store)

    def fingerprint(self) -> dict[str, Any]:
        from .determinism import fingerprint

        t = self.trainer
        return fingerprint(f"trainer{t.rank}", {"layout": {"dp": t.dp, "tp": t.tp, "pp": 1},
                                                 "dtype": t.dtype, "device": str(t.device)})

    def train_step(self, samples, global_tokens):
        _maybe_hang("train_step")
        return self.trainer.train_step(samples, global_tokens)

    def export_hf(self, dtype: str):
        from .ledger import tensor_digests

        tensors = self.trainer.export_hf(dtype)
        if tensors is None:  # a TP rank other than 0: it took part in the gather
            return None, None
        return tensors, tensor_digests(tensors, self.trainer.cfg.ledger.tensor_hash)

    def weight_hashes(self) -> dict[str, str] | None:
        return self.trainer.weight_hashes()

    def doctor(self) -> list[dict[str, Any]]:
        from dataclasses import asdict

        from .doctor import worker_checks

        return [asdict(c) for c in worker_checks(f"trainer{self.args[3]}", config_from_json(self.args[0]))]

    def flip_bit(self, tensor: str, index: int, bit: int) -> None:
        self.trainer.flip_bit(tensor, index, bit)

    def save_checkpoint(self, path: str) -> None:
        self.trainer.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.trainer.load_checkpoint(path)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()


class RolloutWorker:
    def __init__(self, cfg_json: str, model_dir: str):
        quiet.install()
        self.args = (cfg_json, model_dir)
        self.engine = None

    def env(self) -> dict[str, Any]:
        return _process_info("rollout")

    def setup(self) -> dict[str, Any]:
        from .determinism import apply_process_settings
        from .rollout import make_engine

        _need_paths(self.args[1])
        cfg = config_from_json(self.args[0])
        apply_process_settings(cfg.determinism.enabled, cfg.seed, cfg.resources.cpu_threads)
        self.engine = make_engine(cfg, self.args[1])
        return self.engine.info()

    def fingerprint(self) -> dict[str, Any]:
        from .determinism import fingerprint

        return fingerprint("rollout", {"engine": self.engine.info()})

    def generate(self, prompts, seeds, params):
        _maybe_hang("generate")
        return self.engine.generate(prompts, seeds, params)

    def doctor(self) -> list[dict[str, Any]]:
        from dataclasses import asdict

        from .doctor import worker_checks

        return [asdict(c) for c in worker_checks("rollout", config_from_json(self.args[0]))]

    def selftest(self, quick: bool = True) -> dict[str, Any]:
        from .selftest import batch_invariance, vocab_bound

        res = batch_invariance(self.engine, quick=quick, vocab=vocab_bound(self.args[1]))
        return {"passed": res.passed, "unique": res.unique, "settings": res.settings}

    def sync(self, named_tensors, update: bool) -> list[str]:
        """Load the trainer's tensors (when `update`) and prove the engine holds exactly them."""
        if update:
            self.engine.update_weights(named_tensors)
        return self.engine.verify_weights(named_tensors)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def check_resources(cfg: RunConfig) -> None:
    """Fail early, before any download or conversion, when a local run cannot get its GPUs or its
    model source is unusable (a GGUF that is missing or of an unsupported kind)."""
    from .config import ConfigError
    from .models import check_source

    check_source(cfg.model)
    if not cfg.on_gpu or cfg.resources.ray_address:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    twice.choose(cfg, have)  # side_by_side without GPUs for both runs fails here, before any work
    if have < cfg.resources.num_gpus:
        raise ConfigError(
            f"profile {cfg.profile!r} needs {cfg.resources.num_gpus} GPU(s) but this machine has {have}. "
            "Use --profile tiny-cpu (or the flow's profile=auto), or set resources.ray_address to a Ray "
            "cluster with GPUs")
    if cfg.backends.rollout == "sglang":
        import importlib.util

        if importlib.util.find_spec("sglang") is None:
            raise ConfigError("backends.rollout=sglang but SGLang is not installed here "
                              "(pip install 'det-rl[gpu]', or use the docker/ image)")


_RAY_LOCK = threading.Lock()
_ray_users = 0  # runs in this process using the local Ray that ensure_ray started (side-by-side runs share it)


def ensure_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster or start a local one. Returns whether the caller must
    `release_ray()` when done: the last run out of a Ray this process started shuts it down."""
    global _ray_users
    import ray

    with _RAY_LOCK:
        if ray.is_initialized():
            if _ray_users:
                _ray_users += 1
                return True
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                                  "configure_logging": True, "log_to_driver": True}
        # "local": a fresh instance even when `ray start` left a cluster behind; joining one is explicit
        ray.init(address=cfg.resources.ray_address or "local", **kwargs)
        _ray_users = 1
    if not cfg.resources.ray_address:  # our own local Ray: stop it even if this process is killed
        from . import reaper

        node = getattr(ray._private.worker, "_global_node", None)  # no public API names the session dir
        if node is not None:
            reaper.start(node.get_session_dir_path())
    return True


def release_ray() -> None:
    global _ray_users
    import ray

    with _RAY_LOCK:
        _ray_users -= 1
        if _ray_users <= 0:
            _ray_users = 0
            ray.shutdown()


class PhaseTimeout(RuntimeError):
    """A phase did not finish in time (a hung engine, NCCL collective or worker); the run is stopped."""


# Fault injection for the timeout tests: a worker whose env has DETRL_HANG=<method> sleeps in that
# method until it is killed (set it through resources.worker_env).
HANG_ENV = "DETRL_HANG"


def _maybe_hang(method: str) -> None:
    if os.environ.get(HANG_ENV) == method:
        while True:
            time.sleep(3600)


class Workers:
    """The actors of one run: `trainers` (one per data-parallel rank) and `rollout`."""

    def __init__(self, cfg: RunConfig, model_dir: str, ckpt_dir: str, *, setup: bool = True):
        """`setup=False`: start the actors with their env and resources but load nothing (preflight)."""
        self.cfg, self.model_dir, self.ckpt_dir, self.setup = cfg, model_dir, ckpt_dir, setup
        self.trainers: list[Any] = []
        self.rollout: Any = None
        self.fingerprints: dict[str, Any] = {}
        self.engine_info: dict[str, Any] = {}
        self.placement: dict[str, Any] = {}
        self._started_ray = False
        self._pg = None
        self._hung = False

    def wait(self, refs: Any, phase: str, iteration: int | None = None) -> Any:
        """ray.get with the phase's time limit; a timeout names the phase and stops the run."""
        import ray
        from ray.exceptions import GetTimeoutError

        limit = self.cfg.startup_timeout() if iteration is None else self.cfg.phase_timeout()
        try:
            return ray.get(refs, timeout=limit)
        except GetTimeoutError:
            self._hung = True
            where = "start-up" if iteration is None else f"iteration {iteration}"
            key = "timeouts.startup_s" if iteration is None else "timeouts.phase_s"
            raise PhaseTimeout(f"{where}: the {phase} phase did not finish within {limit:.0f} s ({key}); a hung "
                               "engine, NCCL collective or worker is the usual cause. The run's workers were "
                               f"stopped; raise {key} if the phase is only slow") from None

    def __enter__(self) -> Workers:
        import ray

        self._started_ray = ensure_ray(self.cfg)
        try:
            self._create()
            if not self.setup:
                return self
            self._check_env()
            addr, port = self.wait(self.trainers[0].rendezvous.remote(), "trainer rendezvous")
            if self.cfg.on_gpu and self.cfg.resources.colocate:
                # SGLang sizes its memory pool from what is free when it starts: start it first
                self.engine_info = self.wait(self.rollout.setup.remote(), "engine start")
                self.wait([t.setup.remote(addr, port) for t in self.trainers], "trainer start")
            else:
                setups = [t.setup.remote(addr, port) for t in self.trainers] + [self.rollout.setup.remote()]
                self.engine_info = self.wait(setups, "worker start")[-1]
            fps = self.wait([t.fingerprint.remote() for t in self.trainers] + [self.rollout.fingerprint.remote()],
                            "fingerprint")
            self.fingerprints = {fp["role"]: fp for fp in fps}
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _create(self) -> None:
        """One actor per trainer rank and one rollout actor. On GPUs, and on any cluster, the
        trainers take placement-group bundles (PACK: one node while it fits, then the next)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg, res = self.cfg, self.cfg.resources
        cfg_json = json.dumps(cfg.model_dump(mode="json"))
        world = res.trainer_ranks
        trainer_cls, rollout_cls = ray.remote(TrainerWorker), ray.remote(RolloutWorker)
        t_env, r_env = runtime_env(cfg, "trainer"), runtime_env(cfg, "rollout")
        args = (cfg_json, self.model_dir, self.ckpt_dir)
        if not cfg.on_gpu and not res.ray_address:
            # num_cpus=0: long-lived actors that size their own threads; a 1-core host still fits both
            self.trainers = [trainer_cls.options(num_cpus=0, runtime_env=t_env).remote(*args, r, world)
                             for r in range(world)]
            self.rollout = rollout_cls.options(num_cpus=0, runtime_env=r_env).remote(cfg_json, self.model_dir)
            return
        if cfg.on_gpu:
            bundles = [{"GPU": 1, "CPU": 1}] * (world if res.colocate else world + 1)
        else:
            bundles = [{"CPU": 1}] * world
        self._pg = placement_group(bundles, strategy="PACK")
        ray.get(self._pg.ready(), timeout=600)

        def on(bundle: int) -> Any:
            return PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=bundle)

        if not cfg.on_gpu:
            self.trainers = [trainer_cls.options(num_cpus=1, runtime_env=t_env, scheduling_strategy=on(r)).remote(
                *args, r, world) for r in range(world)]
            self.rollout = rollout_cls.options(num_cpus=0, runtime_env=r_env).remote(cfg_json, self.model_dir)
            return
        share = 0.5 if res.colocate else 1.0
        self.trainers = [trainer_cls.options(num_cpus=0, num_gpus=share if (res.colocate and r == 0) else 1.0,
                                             runtime_env=t_env, scheduling_strategy=on(r)).remote(*args, r, world)
                         for r in range(world)]
        self.rollout = rollout_cls.options(num_cpus=0, num_gpus=share, runtime_env=r_env,
                                           scheduling_strategy=on(0 if res.colocate else world)).remote(
            cfg_json, self.model_dir)

    def _check_env(self) -> None:
        import ray

        infos = self.wait([a.env.remote() for a in [*self.trainers, self.rollout]], "worker env check")
        self.env_readback = {i["role"]: i["env"] for i in infos}
        self.placement = {i["role"]: {k: i[k] for k in ("node_ip", "node_id", "pid", "cuda_visible_devices")} for i in infos}
        if not self.cfg.determinism.enabled:
            return
        problems = [p for i in infos for p in env_problems(i["env"], self.cfg.determinism.env, i["role"])]
        fa3 = [f"{i['role']}: FlashAttention-3 is importable ({i['fa3']}); remove it: pip uninstall -y flash_attn_3"
               for i in infos if i["fa3"]]
        if fa3:
            raise DeterminismError("determinism is on but FA3 is installed where the run would use it:\n  "
                                   + "\n  ".join(fa3))
        if problems:
            raise DeterminismError("determinism is on but workers lack required settings:\n  "
                                   + "\n  ".join(problems) + "\ndet-rl passes them through the Ray runtime_env "
                                   "unless resources.worker_env removes one; on a cluster, export them on every node")

    def __exit__(self, *exc: Any) -> None:
        import ray

        actors = [*self.trainers, self.rollout]
        closes = [a.close.remote() for a in actors if a is not None]
        try:  # a hung actor runs no close() before its hung call returns: kill it at once
            ray.get(closes, timeout=5 if self._hung else 120)
        except Exception:
            pass
        for a in actors:
            if a is not None:
                ray.kill(a)
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
        self.trainers, self.rollout = [], None
        if self._started_ray:
            release_ray()
