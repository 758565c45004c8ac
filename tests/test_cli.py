"""The command line as users call it: exit codes 0 identical / 1 diverged / 2 incomplete or bad input /
3 the run itself failed."""

import json

import pytest
from conftest import ROOT, detrl, tiny_run

pytestmark = pytest.mark.integration  # the CLI in fresh processes, real conversions


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["run", "--profile", "tiny-cpu", "--out", "x", "--set", "rollout.temprature=1"],
            "did you mean 'rollout.temperature'",
        ),
        (["run", "--profile", "nope", "--out", "x"], "unknown profile 'nope'"),
        (
            ["run", "--profile", "gsm8k-qwen2.5-0.5b", "--out", "x", "--set", "resources.num_gpus=0"],
            "backends.rollout=hf",
        ),
        (["run", "--out", "x"], "give --profile NAME or --config FILE"),
        (["run", "--profile", "tiny-cpu", "--out", "x", "--plant", "one:two"], "ITER:TENSOR"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    from detrl.cli import main

    assert main([*args, "--cache", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (ROOT / "x").exists()


def test_unreachable_model_fails_before_any_work(tmp_path, capsys):
    from detrl.cli import main

    code = main(tiny_run(tmp_path / "run", tmp_path / "c", "model.source=hub", "model.name=nobody/nothing"))
    assert code == 2 and "could not download model 'nobody/nothing'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c" / "megatron").exists()


@pytest.mark.integration
def test_reproduce_side_by_side_with_a_planted_flip_exits_1_and_names_it(tmp_path, runs, cache_dir):
    out = tmp_path / "rep"
    r = detrl(
        "reproduce",
        "--profile",
        "tiny-cpu",
        "--out",
        str(out),
        "--cache",
        str(cache_dir),
        "--plant",
        "2:decoder.layers.0.mlp.linear_fc1.weight",
        "--set",
        "resources.twice=side_by_side",
        "--json",
    )
    assert r.returncode == 1 and "{" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert "runs A and B: side by side" in r.stdout
    # runs that overlapped in time record what a sequential pair (the `runs` fixture) records
    from detrl.verify import verify

    assert verify(str(out / "run_a"), str(runs / "a")).status == "identical"
    seq = verify(str(runs / "a"), str(out / "run_b"))
    assert (
        seq.status == "diverged" and seq.first.where() == verify(str(out / "run_a"), str(out / "run_b")).first.where()
    )
    # a clean log: progress, not library noise (detrl/quiet.py), and nothing else warned either
    lines = (r.stdout[: r.stdout.index("{")] + r.stderr).splitlines()
    assert not [
        x
        for x in lines
        if any(
            n in x
            for n in (
                "Apex",
                "Transformer Engine",
                "ShardedTensor",
                "Token authentication",
                "past_key_values",
                "Warning",
                "warnings.warn",
            )
        )
    ], lines
    verdict = json.loads(r.stdout[r.stdout.index("{") :])
    assert verdict["status"] == "diverged"
    assert verdict["first"]["iteration"] == 2 and verdict["first"]["phase"] == "policy_weights"
    # element 0 of Megatron's fused fc1 lies in its gate half
    assert verdict["first"]["tensors"] == ["model.layers.0.mlp.gate_proj.weight"]
    # the same two ledgers through `verify`: text and markdown views, same exit code
    r2 = detrl("verify", str(out / "run_a"), str(out / "run_b"))
    assert r2.returncode == 1 and "first divergence: iteration 2, phase policy_weights" in r2.stdout
    r3 = detrl("verify", str(out / "run_a"), str(out / "run_b"), "--markdown")
    assert r3.returncode == 1 and "DIVERGED" in r3.stdout and "## First divergence" in r3.stdout
    r4 = detrl("verify", str(out / "run_a"), str(out / "run_a"))  # one run twice certifies nothing
    assert r4.returncode == 2 and r4.stdout.startswith("SAME RUN"), r4.stdout
    (out / "run_b" / "ledger.jsonl").write_text("")
    assert detrl("verify", str(out / "run_a"), str(out / "run_b")).returncode == 2


def _out_dirs(tmp_path):
    from conftest import ledger_records as records
    from conftest import write_ledger as write

    stale = tmp_path / "stale"
    (stale / "steps" / "iter_00007").mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    return {
        "complete": (write(tmp_path / "complete", records()), "already holds a complete run ledger"),
        "unfinished": (
            write(tmp_path / "unfinished", records()[:-1]),
            "already holds an unfinished (2 iterations) run ledger",
        ),
        "not empty": (stale, "is not empty (config.json, steps/)"),
        "not a directory": (tmp_path / "afile" / "out", "cannot write the run directory"),
        "read-only": ("/sys/detrl-out", "cannot write the run directory"),
        "a file": (tmp_path / "afile", "is a file, not a directory"),
    }


@pytest.mark.parametrize("command", ["run", "reproduce"])
def test_out_is_checked_before_any_work_and_never_clobbered(tmp_path, capsys, command):
    from detrl.cli import main

    cache = tmp_path / "cache"
    for name, (out, says) in _out_dirs(tmp_path).items():
        code = main([command, "--profile", "tiny-cpu", "--out", str(out), "--cache", str(cache)])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (name, code, err)
        assert not cache.exists(), name  # nothing downloaded, generated or converted
    assert (tmp_path / "stale" / "config.json").read_text() == "{}"
    assert (tmp_path / "complete" / "ledger.jsonl").stat().st_size > 0


def test_resume_needs_a_ledger_of_the_same_config(tmp_path, capsys):
    from conftest import ledger_records as records
    from conftest import write_ledger as write

    from detrl.cli import main

    (tmp_path / "empty").mkdir()
    code = main([*tiny_run(tmp_path / "empty", tmp_path / "c"), "--resume"])
    assert code == 2 and "holds no ledger.jsonl, so there is no run to continue" in capsys.readouterr().err
    run = write(tmp_path / "run", records()[:-1])
    code = main([*tiny_run(run, tmp_path / "c", "train.lr=0.5", "checkpoint.keep=4"), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "different config (train.lr: 0.001 -> 0.5)" in err, err
    assert not (tmp_path / "c").exists()
