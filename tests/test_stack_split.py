"""benchmarks/stack_split.py on lines in the format of py-spy 0.4's raw output (as it recorded a child
process on this machine): seconds land on the process that ran them and under the frame asked for."""

import gzip
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import stack_split  # noqa: E402

# two processes, as `py-spy record --subprocesses --idle --threads --format raw` writes them: each
# sample names the process's ancestors first, then its thread, then frames from the root down
FLOW, SCHED = 'process 10:"python flow.py"', 'process 11:"sglang::scheduler"'
RAW = "".join(
    f"{stack} {n}\n"
    for stack, n in [
        (f"{FLOW};thread (10);<module> (flow.py:3);main (flow.py:9);wait (ray/worker.py:88)", 50),
        (
            f"{FLOW};{SCHED};thread (11);run (sched.py:1);capture (cuda_graph.py:2);compile (triton/compiler.py:30)"
            ";_run (triton/compiler.py:40)",
            25,
        ),
        (f"{FLOW};{SCHED};thread (11);run (sched.py:1);capture (cuda_graph.py:2);forward (llama.py:5)", 5),
        (f"{FLOW};{SCHED};thread (11);run (sched.py:1);event_loop (sched.py:7)", 100),
    ]
)


def split(tmp_path, text: str, *args: str, capsys) -> str:
    f = tmp_path / "raw.txt.gz"
    with gzip.open(f, "wt") as out:
        out.write(text)
    assert stack_split.main([str(f), "--rate", "25", *args]) == 0
    return capsys.readouterr().out


def test_seconds_go_to_the_sampled_process_and_the_frames_under_the_one_asked_for(tmp_path, capsys):
    out = split(tmp_path, RAW, "--under", "capture", capsys=capsys)
    procs = out.split("## seconds per process")[1].split("##")[0]
    assert '1.2  process 11:"sglang::scheduler"' in procs  # 30 samples at 25 per second
    assert "flow.py" not in procs  # its samples are not under `capture`
    inclusive = out.split("## inclusive seconds")[1].split("##")[0]
    assert "1.0  compile (triton/compiler.py)" in inclusive
    assert "event_loop" not in inclusive
    assert "0.2  forward (llama.py)" in out.split("## leaf seconds")[1]


def test_without_a_filter_every_process_counts_and_process_frames_are_not_code(tmp_path, capsys):
    out = split(tmp_path, RAW, capsys=capsys)
    procs = out.split("## seconds per process")[1].split("##")[0]
    assert '2.0  process 10:"python flow.py"' in procs and '5.2  process 11:"sglang::scheduler"' in procs
    assert "thread (" not in out.split("## inclusive seconds")[1]


def test_a_command_line_with_newlines_stays_one_sample_of_its_process(tmp_path, capsys):
    # `python -c CODE` with CODE over two lines, as py-spy writes it: the sample spans three lines
    child = 'process 12:"python -c import time\ndef busy():\n    pass"'
    out = split(tmp_path, f"{FLOW};{child};thread (12);<module> (<string>:5);busy (<string>:4) 50\n", capsys=capsys)
    procs = out.split("## seconds per process")[1].split("##")[0]
    assert "2.0  process 12:" in procs and "?" not in procs
    assert "2.0  busy (<string>)" in out.split("## leaf seconds")[1]


def test_an_import_is_split_by_the_modules_it_imports_not_by_importlib_frames(tmp_path, capsys):
    # as py-spy recorded `import torch` here: importlib's frames between each `<module>` and the next
    boot = "_find_and_load (<frozen importlib._bootstrap>:1360);_load_unlocked (<frozen importlib._bootstrap>:935)"
    top = f"{FLOW};thread (10);<module> (<string>:1);{boot};<module> (site/torch/__init__.py:40)"
    out = split(
        tmp_path,
        f"{top};{boot};<module> (torch/nn/__init__.py:2) 20\n"
        f"{top};{boot};get_data (<frozen importlib._bootstrap_external>:1190) 5\n",
        "--under",
        r"^<module> .*torch/__init__\.py",
        capsys=capsys,
    )
    inclusive = out.split("## inclusive seconds")[1].split("##")[0]
    assert "1.0  <module> (site/torch/__init__.py)" not in inclusive  # short() keeps two path parts
    assert "1.0  <module> (torch/__init__.py)" in inclusive and "0.8  <module> (nn/__init__.py)" in inclusive
    assert "frozen importlib" not in inclusive
    assert "0.2  get_data (<frozen importlib._bootstrap_external>)" in out.split("## leaf seconds")[1]
