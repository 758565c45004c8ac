"""Every input is checked before any work, and nothing around the ledger goes unhashed.

The table of inputs, where each is first used, and the check that now comes before any download,
conversion or worker start (exit 2, one line with the fix):

| input                   | first used                      | checked in                               |
|-------------------------|---------------------------------|------------------------------------------|
| --seed, rollout.seed    | data order, sampling seeds      | config (0 <= seed < 2**31)               |
| --plant ITER:TENSOR     | the trainer, at iteration ITER  | plant.parse_plants (CLI, flow), then the |
|                         |                                 | model's own names before the workers     |
| --cache                 | the first download              | rundir.check_cache_dir                   |
| --out                   | the first ledger write          | rundir.check_out_dir, rundir.exclusive   |
| reward                  | the first rollout's rewards     | rewards.check (import, signature), then  |
|                         |                                 | a probe on the first row                 |
| notify / $DETRL_NOTIFY  | the flow's end                  | tasks.notify.check_target at flow start  |
| golden RUN              | the comparison                  | golden.check: a torn ledger is exit 2    |
| cached dataset file     | the run's prompts               | data.fetch_dataset (CacheError, --refresh)|
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, detrl_cmd, tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detrl.cli import main
from detrl.config import is_semantic, load_config
from detrl.ledger import read_ledger, step_data_path
from detrl.notify import target_problem
from detrl.rundir import LOCK_FILE, check_out_dir, exclusive
from detrl.verify import dict_diff, verify

BAD_ARGS = {
    "negative seed": (["--seed", "-1"], "greater than or equal to 0"),
    "huge seed": (["--seed", "99999999999999999999999"], "less than or equal to 2147483647"),
    "unknown tensor": (["--plant", "0:no.such.tensor"], "has no tensor 'no.such.tensor'"),
    "misspelt tensor": (["--plant", "0:decoder.layers.0.mlp.linear_fc9.weight"], "did you mean"),
    "unreachable plant": (["--plant", "5:decoder.layers.0.mlp.linear_fc1.weight"], "never reached"),
    "bad rollout seed": (["--set", "rollout.seed=-5"], "rollout.seed"),
}


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_input_exits_2_before_any_work(tmp_path, capsys, case):
    args, message = BAD_ARGS[case]
    out = tmp_path / "out"
    code = main([*tiny_run(out, tmp_path / "cache"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing downloaded, nothing written


def test_an_unwritable_cache_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(tiny_run(tmp_path / "out", blocker / "cache"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot write the cache directory" in err, err


@pytest.mark.parametrize(
    "dest,ok",
    [
        ("https://hooks.example.com/x", True),
        ("http://10.0.0.1:8080/hook", True),
        ("slack-webhook/nightly", True),
        ("file:///etc/passwd", False),
        ("javascript:alert(1)", False),
        ("https://", False),
        ("nightly", False),
    ],
)
def test_notify_targets_are_urls_or_block_names(dest, ok):
    assert (target_problem(dest) is None) == ok


HOLD = "with exclusive(Path('{d}')):"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}


@pytest.mark.integration
def test_one_writer_per_run_directory_and_a_dead_holder_never_blocks(tmp_path):
    d = tmp_path / "run"
    with exclusive(d):
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from detrl.rundir import exclusive\nwith exclusive(__import__('pathlib').Path({str(d)!r})): pass",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr, other.stderr[-500:]
        early = subprocess.run(  # the CLI's check before any download names the holder too
            [sys.executable, "-c", f"from detrl.rundir import check_out_dir\ncheck_out_dir({str(d)!r})"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert f"being written by another det-rl run (pid {os.getpid()})" in early.stderr, early.stderr[-500:]
    assert not (d / LOCK_FILE).exists()  # released and removed: nothing left behind
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time\nfrom pathlib import Path\nfrom detrl.rundir import exclusive\n{HOLD.format(d=d)}\n"
            "    print('held', flush=True)\n    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (d / LOCK_FILE).exists()  # the file stays after kill -9, but the lock went with the process
    with exclusive(d):
        check_out_dir(d)  # our own lock file is not "another run's" content


@pytest.mark.integration
def test_two_runs_into_one_new_directory_one_runs_and_the_other_exits_2(tmp_path, cache_dir, artifacts):
    out = tmp_path / "same"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            detrl_cmd(*tiny_run(out, cache_dir)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "being written by another det-rl run" in loser or "not empty" in loser or "already holds" in loser, loser
    led = read_ledger(out)
    assert led.complete and not led.problems  # one header, the winner's run, untouched


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_swapped_or_truncated_steps_file_makes_the_ledger_invalid(runs, tmp_path):
    swapped = _copy(runs / "b", tmp_path / "swapped")
    p0, p1 = step_data_path(swapped, 0), step_data_path(swapped, 1)
    b0, b1 = p0.read_bytes(), p1.read_bytes()
    p0.write_bytes(b1)
    p1.write_bytes(b0)
    v = verify(str(runs / "a"), str(swapped))
    assert v.status == "invalid" and v.exit_code == 2 and "iter_00000.safetensors" in v.problems[0], v.problems
    cut = _copy(runs / "b", tmp_path / "cut")
    p = step_data_path(cut, 2)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    r = subprocess.run(
        detrl_cmd("verify", str(runs / "a"), str(cut)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and "iter_00002.safetensors" in r.stdout and "Traceback" not in r.stderr, (
        r.stdout + r.stderr
    )


STRICT = {
    "duplicated key": lambda line: line.replace('{"hashes"', '{"iteration":99,"hashes"', 1),
    "NaN": lambda line: line.replace('"loss":', '"loss":NaN,"x_loss":', 1),
    "BOM": lambda line: "\ufeff" + line,
}


@pytest.mark.parametrize("case", STRICT)
def test_json_records_are_parsed_strictly(runs, tmp_path, case):
    d = _copy(runs / "b", tmp_path / case.replace(" ", "_"))
    lines = (d / "ledger.jsonl").read_text().splitlines()
    lines[1] = STRICT[case](lines[1])
    (d / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    led = read_ledger(d)
    assert led.invalid and ":2:" in led.problems[0], led.problems


@pytest.mark.parametrize("value", ['"2"', "2.0"])
def test_a_retyped_non_semantic_config_value_is_invalid(runs, tmp_path, value):
    d = _copy(runs / "b", tmp_path / f"keep{value.strip(chr(34))}")
    lines = (d / "ledger.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["config"]["checkpoint"]["keep"] == 2
    lines[0] = lines[0].replace('"keep":2', f'"keep":{value}', 1)
    (d / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    led = read_ledger(d)
    assert led.invalid and "config.checkpoint.keep" in led.problems[0], led.problems


def test_a_changed_dataset_cache_file_stops_the_run_until_refresh(tmp_path):
    from detrl.data import fetch_dataset
    from detrl.util import CacheError

    cfg = load_config("tiny-cpu")
    art = fetch_dataset(cfg.data, tmp_path)
    path = __import__("pathlib").Path(art.path)
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="--refresh"):
        fetch_dataset(cfg.data, tmp_path)
    assert fetch_dataset(cfg.data, tmp_path, refresh=True).sha256 == art.sha256


def test_golden_on_a_torn_ledger_exits_2(runs, tmp_path, capsys):
    torn = _copy(runs / "a", tmp_path / "torn")
    data = (torn / "ledger.jsonl").read_bytes()
    (torn / "ledger.jsonl").write_bytes(data[:-30])
    code = main(["golden", str(torn), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and "only a complete, valid ledger" in err and "Traceback" not in err


def test_verify_into_a_closed_pipe_is_quiet_and_keeps_its_exit_code(runs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        p = subprocess.Popen(
            detrl_cmd("verify", str(runs / "a"), str(runs / "b")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        first = p.stdout.readline()
        p.stdout.close()  # as `| head -1` does
        code = p.wait(timeout=120)
        err = p.stderr.read().decode()
        assert first.startswith(b"IDENTICAL") and code == 0 and "Traceback" not in err, err


# The bytes a verdict depends on: every iteration's hashes, tensors, step-data hash and eval, and the header's
# semantic config, artifacts' content keys and config hash (stats, times, paths, labels and the environment
# only describe the run; a non-semantic key such as a log level cannot change results, and the verdict names
# it when it differs).
def _depended_on(led):
    from detrl.verify import ARTIFACT_KEYS

    head = led.header or {}
    artifacts = {
        n: {k: v for k, v in a.items() if k in ARTIFACT_KEYS} for n, a in (head.get("artifacts") or {}).items()
    }
    return (
        [(r["hashes"], r["tensors"], r.get("step_data"), (r.get("eval") or {}).get("tokens")) for r in led.iterations],
        [d for d in dict_diff({}, head.get("config") or {}) if is_semantic(d.split(": ", 1)[0], deterministic=True)],
        artifacts,
        head.get("config_hash"),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_single_byte_or_record_edit_of_run_b_passes_unless_it_left_what_the_verdict_reads(
    runs, tmp_path_factory, data
):
    d = _copy(runs / "b", tmp_path_factory.mktemp("edit") / "b")
    unedited = read_ledger(d)
    before = _depended_on(unedited)
    target = data.draw(st.sampled_from(["ledger.jsonl", "steps", "record"]))
    if target == "steps":
        p = step_data_path(d, data.draw(st.integers(0, 2)))
        blob = bytearray(p.read_bytes())
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
        p.write_bytes(bytes(blob))
    elif target == "ledger.jsonl":
        p = d / "ledger.jsonl"
        blob = bytearray(p.read_bytes())
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
        p.write_bytes(bytes(blob))
    else:  # drop, duplicate or swap whole records
        p = d / "ledger.jsonl"
        lines = p.read_text().splitlines(keepends=True)
        i, j = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "swap"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        p.write_text("".join(lines))
    v = verify(str(runs / "a"), str(d))
    if v.exit_code == 0:
        after = read_ledger(d)
        assert _depended_on(after) == before, (target, v.problems)
        # what else changed in the config passed only as a named, non-semantic difference
        edited = dict_diff(unedited.header["config"], after.header["config"])
        named = {x.split(": ", 1)[0] for x in v.config_diff_other}
        assert {x.split(": ", 1)[0] for x in edited} <= named, (edited, v.config_diff_other)


KEYS = [
    "seed",
    "rollout.seed",
    "train.steps",
    "train.lr",
    "rollout.temperature",
    "rollout.max_new_tokens",
    "resources.num_gpus",
    "checkpoint.keep",
    "data.name",
    "model.name",
    "reward",
    "train.on_policy",
    "eval.every",
    "determinism.env.NCCL_ALGO",
    "no.such.key",
]
VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.booleans(),
    st.just("[1, 2"),
    st.just("a: b: c"),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.one_of(st.none(), st.integers(-(2**70), 2**70)),
    key=st.sampled_from(KEYS),
    value=VALUES,
    plant=st.one_of(st.none(), st.text(max_size=24), st.just("1:decoder.layers.0.mlp.linear_fc1.weight")),
)
def test_random_arguments_get_exit_2_and_never_a_traceback(tmp_path_factory, capsys, seed, key, value, plant):
    """Whatever the values, `run` answers before any work: into a busy --out every run is refused, so any
    input either is refused for itself or reaches that refusal; exit 2 with one message, never a traceback."""
    base = tmp_path_factory.mktemp("cli")
    busy = base / "busy"
    busy.mkdir()
    (busy / "other.txt").write_text("someone else's file")
    args = ["run", "--profile", "tiny-cpu", "--out", str(busy), "--cache", str(base / "cache")]
    args += ["--set", f"{key}={value}"]
    args += [] if seed is None else ["--seed", str(seed)]
    args += [] if plant is None else ["--plant", plant]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("detrl: error:"), (args, err[-600:])
    assert not (base / "cache").exists()


def test_an_argument_value_that_looks_like_an_option_is_bad_input_with_the_fix(tmp_path, capsys):
    """argparse takes `--plant -x` for an option; in-process as from the shell it is exit 2 with our message
    (found by the property test above), never argparse's own exit from inside the parser."""
    code = main(["run", "--profile", "tiny-cpu", "--out", str(tmp_path / "o"), "--plant", "-x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("detrl: error: detrl run: argument --plant: expected one argument")
    assert "--plant=-1:NAME" in err and not (tmp_path / "o").exists()
    assert main(["verify"]) == 2 and "the following arguments are required" in capsys.readouterr().err
