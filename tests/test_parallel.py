"""Parallel layouts on the CPU (gloo): Megatron tensor parallel 2, and trainer ranks spread over two
Ray nodes reached by address. Each layout is run and verified like the single-rank loop."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, detrl_cmd, tiny_run
from safetensors.numpy import load_file

from detrl.config import ConfigError, load_config
from detrl.ledger import read_ledger
from detrl.loop import run
from detrl.plant import Perturbation
from detrl.verify import verify

pytestmark = pytest.mark.integration
TP2 = ["train.steps=2", "resources.trainer_ranks=2", "resources.tensor_parallel=2"]


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, artifacts, ray_session):
    """One tensor-parallel run, "a". Its twins are the planted run (identical until the flip) and the
    two-node run (identical throughout): a third run of the same layout would prove nothing more."""
    d = tmp_path_factory.mktemp("tp")
    run(load_config("tiny-cpu", overrides=TP2), d / "a", artifacts)
    return d


def test_tensor_parallel_shards_gather_to_the_single_rank_model(tp_runs, runs):
    """Iteration 0 syncs the converted checkpoint: gathered from two shards it must be bit for bit
    the single-rank export, and the trainer's log-probs must agree to float rounding."""
    fps = read_ledger(tp_runs / "a").header["fingerprints"]
    assert fps["trainer0"]["layout"] == fps["trainer1"]["layout"] == {"dp": 1, "tp": 2, "pp": 1}
    tp, one = read_ledger(tp_runs / "a").iterations[0], read_ledger(runs / "a").iterations[0]
    assert tp["tensors"]["policy_weights"] == one["tensors"]["policy_weights"]
    assert tp["hashes"]["rollout_tokens"] == one["hashes"]["rollout_tokens"]
    lp_tp = load_file(str(tp_runs / "a" / "steps" / "iter_00000.safetensors"))["trainer_logprobs"]
    lp_one = load_file(str(runs / "a" / "steps" / "iter_00000.safetensors"))["trainer_logprobs"]
    np.testing.assert_allclose(lp_tp, lp_one, atol=1e-5)
    assert tp["stats"]["grad_norm"] == pytest.approx(one["stats"]["grad_norm"], rel=1e-5)


def test_a_flip_in_a_tensor_parallel_shard_is_caught_with_its_hf_name(tp_runs, artifacts):
    # fc1 holds [gate; up] on each rank: element 0 of the gathered tensor is gate_proj's
    cfg = load_config("tiny-cpu", overrides=TP2)
    run(
        cfg, tp_runs / "flip", artifacts, perturbations=[Perturbation.parse("1:decoder.layers.0.mlp.linear_fc1.weight")]
    )
    v = verify(str(tp_runs / "a"), str(tp_runs / "flip"))
    # (the first divergence is at iteration 1: the two runs agree in every phase of iteration 0)
    assert v.status == "diverged" and (v.first.iteration, v.first.phase) == (1, "policy_weights")
    assert v.first.tensors == ["model.layers.0.mlp.gate_proj.weight"]


def test_tensor_parallel_must_divide_ranks_and_the_model(tmp_path, artifacts):
    with pytest.raises(ConfigError, match="must divide resources.trainer_ranks=3"):
        load_config("tiny-cpu", overrides=["resources.trainer_ranks=3", "resources.tensor_parallel=2"])
    cfg = load_config(
        "tiny-cpu",
        overrides=["resources.trainer_ranks=3", "resources.tensor_parallel=3", "rollout.samples_per_prompt=3"],
    )
    with pytest.raises(ConfigError, match=r"tensor_parallel=3 must divide the model's attention heads"):
        run(cfg, tmp_path / "r", artifacts)
    assert not (tmp_path / "r").exists()  # refused before any worker started or file was written


def test_ranks_on_two_ray_nodes_by_address_match_one_node(tmp_path, tp_runs, cache_dir):
    """A Ray cluster of two nodes (one CPU each) on this machine: `detrl run` connects by address,
    the two tensor-parallel ranks land on different nodes and meet at rank 0's node; the ledger equals
    the single-node tensor-parallel run's (the module's, so the reference costs no run of its own).
    This is also the module's proof that two tensor-parallel runs are identical in every phase."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20}
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        cmd = detrl_cmd(*tiny_run(tmp_path / "cluster", cache_dir, *TP2, f"resources.ray_address={cluster.address}"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        cluster.shutdown()
    header = json.loads((tmp_path / "cluster" / "ledger.jsonl").read_text().splitlines()[0])
    nodes = {role: p["node_id"] for role, p in header["placement"].items()}
    assert nodes["trainer0"] != nodes["trainer1"], nodes
    v = verify(str(tp_runs / "a"), str(tmp_path / "cluster"))
    assert v.status == "identical", (v.first, v.problems)


SHARED_GPU_PLACEMENT = """
import json, time, ray
from detrl import twice
from detrl.config import load_config
from detrl.ray.group import Workers

ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
cfg = twice.run_config(load_config("gsm8k-qwen2.5-0.5b-smoke"), "shared_gpu")


def free_gpu(expected):
    # Ray's view of free resources trails a placement group's creation and removal: read it until it
    # shows the expected value or 10 s have passed, and report what it showed last
    for _ in range(100):
        free = ray.available_resources().get("GPU", 0)
        if free == expected:
            break
        time.sleep(0.1)
    return free

out = {}
with Workers(cfg, "", "", setup=False) as a:
    out["free_with_one"] = free_gpu(0.5)
    with Workers(cfg, "", "", setup=False) as b:
        out["free_with_two"] = free_gpu(0)
        actors = [x for w in (a, b) for x in (*w.trainers, w.rollout)]
        out["visible"] = [ray.get(x.env.remote())["cuda_visible_devices"] for x in actors]
out["free_after"] = free_gpu(1)
print(json.dumps(out))
"""


def test_two_runs_sharing_a_gpu_take_half_of_it_each():
    """On a Ray node that declares one GPU: a run with gpu_share 0.5 books half of it (its trainer and
    engine a quarter each), a second run fits beside it, and all four workers see the same device."""
    proc = subprocess.run(
        [sys.executable, "-c", SHARED_GPU_PLACEMENT], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["free_with_one"], out["free_with_two"], out["free_after"]) == (0.5, 0, 1.0)
    assert out["visible"] == ["0"] * 4
