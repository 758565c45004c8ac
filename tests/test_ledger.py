"""The verdict can't be fooled by a ledger's structure: every record is validated, and a malformed,
duplicated, reordered or trailing record is exit 2 with file:line, never a traceback, never 0 or 1.
The ledgers here are built from real records' shapes (no Ray needed); tests/test_loop.py checks the
schema against ledgers the loop really wrote."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import hex_digest
from conftest import ledger_records as records
from conftest import write_ledger as write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detrl.config import NON_SEMANTIC, load_config
from detrl.ledger import LEDGER_FILE, combine, read_ledger
from detrl.report import format_text
from detrl.verify import compare, verify


def test_a_well_formed_ledger_reads_back_and_matches_its_copy(tmp_path):
    a, b = write(tmp_path / "a", records()), write(tmp_path / "b", records())
    led = read_ledger(a)
    assert led.complete and not led.invalid and len(led.iterations) == 2
    v = verify(str(a), str(b))
    assert v.status == "identical" and v.exit_code == 0, v.problems


# Structural defects, each with what the problem must say. Line numbers: 1 header, 2-3 iterations, 4 completion.
def _dup_completion(r):
    return r + [r[-1]]


def _dup_iteration(r):
    return r[:2] + [r[1]] + r[2:]


def _trailing(r):
    return r + [{**r[2]}]


def _reordered(r):
    return [r[0], r[2], r[1], r[3]]


def _config_str(r):
    r[0]["config"] = "tiny"
    return r


def _combined_mismatch(r):
    r[1]["tensors"]["weights"][0][1] = "xxh3_128:" + "0" * 32
    return r


def _second_header(r):
    return r[:2] + [r[0]] + r[2:]


def _iteration_as_string(r):
    r[2]["iteration"] = "1"
    return r


def _config_changed_under_its_hash(r):
    r[0]["config"]["train"]["lr"] = 0.5
    return r


def _final_weights_wrong(r):
    r[-1]["final_weights"] = r[1]["hashes"]["weights"]
    return r


def _not_an_object(r):
    return [*r[:2], 5, *r[2:]]


STRUCTURAL = {
    "completion duplicated": (_dup_completion, ":5:", "after the completion record"),
    "iteration duplicated": (_dup_iteration, ":3:", "repeats an iteration"),
    "record after completion": (_trailing, ":5:", "after the completion record"),
    "iterations reordered": (_reordered, ":2:", "iteration 1 where 0 was expected"),
    "config is a string": (_config_str, ":1:", "config: Input should be a valid dictionary (got 'tiny')"),
    "combined weight hash not of its tensors": (_combined_mismatch, ":2:", "hashes.weights is not the combined"),
    "second header": (_second_header, ":3:", "a second header"),
    "iteration number as a string": (
        _iteration_as_string,
        ":3:",
        "iteration: Input should be a valid integer (got '1')",
    ),
    "config edited under its hash": (_config_changed_under_its_hash, ":1:", "config_hash does not match"),
    "final weights not the last iteration's": (_final_weights_wrong, ":4:", "final_weights"),
    "a record that is not an object": (_not_an_object, ":3:", "must be a JSON object, got int 5"),
}


@pytest.mark.parametrize("name", list(STRUCTURAL))
def test_a_structurally_bad_ledger_is_invalid_with_file_and_line(tmp_path, name):
    mutate, line, says = STRUCTURAL[name]
    good = write(tmp_path / "good", records())
    bad = write(tmp_path / "bad", mutate(records()))
    for v in (verify(str(good), str(bad)), verify(str(bad), str(good))):
        assert v.status == "invalid" and v.exit_code == 2, (name, v.status, v.problems)
        assert len(v.problems) == 1, v.problems  # e.g. a duplicate never also reports "no completion record"
        assert f"{LEDGER_FILE}{line}" in v.problems[0] and says in v.problems[0], v.problems
        assert format_text(v).startswith("INVALID LEDGER")


def test_the_cli_says_exit_2_and_where_for_an_invalid_ledger(tmp_path, capsys):
    from detrl.cli import main

    good = write(tmp_path / "good", records())
    bad = write(tmp_path / "bad", _dup_completion(records()))
    code = main(["verify", str(good), str(bad)])
    out = capsys.readouterr()
    assert code == 2, out.out + out.err
    assert "INVALID LEDGER" in out.out and f"{bad / LEDGER_FILE}:5:" in out.out and "Traceback" not in out.err


# Hypothesis: arbitrary structural edits of any record, anywhere. Whatever they are, verify never
# raises and never says 0 or 1 for a ledger that breaks the schema.
WRONG = [None, True, 0, -1, 1.5, "", "x", [], [1], {}, {"a": 1}]


def _paths(rec, prefix=()):
    """Every (path) into a record: top-level keys and the keys of the hash/tensor maps."""
    if isinstance(rec, dict):
        for k, v in rec.items():
            yield (*prefix, k)
            if k in ("hashes", "tensors"):
                yield from _paths(v, (*prefix, k))


def _set(rec, path, value):
    node = rec
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


@st.composite
def structural_edit(draw):
    recs = records()
    kind = draw(st.sampled_from(["retype", "delete", "duplicate", "move", "append", "add_key", "truncate_json"]))
    i = draw(st.integers(0, len(recs) - 1))
    if kind in ("retype", "delete", "add_key"):
        paths = [p for p in _paths(recs[i]) if p[-1] != "stats" and p[:1] != ("stats",)]
        path = draw(st.sampled_from(paths))
        if kind == "add_key":
            path = (*path[:-1], "unexpected_key")
            value = 1
        elif kind == "delete":
            value = _DELETE
        else:
            old = recs[i]
            for k in path:
                old = old[k]
            value = draw(
                st.sampled_from(
                    [
                        w
                        for w in WRONG
                        if type(w) is not type(old)
                        and not (path[-1] == "selftest" and w is None)
                        and not (isinstance(old, float) and type(w) is int)
                    ]
                )
            )
        _set(recs[i], path, value)
        return recs, None
    if kind == "duplicate":
        return recs[: i + 1] + [copy.deepcopy(recs[i])] + recs[i + 1 :], None
    if kind == "move":
        j = draw(
            st.integers(0, len(recs) - 1).filter(
                lambda j: recs[j]["kind"] != recs[i]["kind"] or recs[j].get("iteration") != recs[i].get("iteration")
            )
        )
        recs.insert(j, recs.pop(i))
        return recs, None
    if kind == "append":
        return recs + [copy.deepcopy(recs[i])], None
    lines = [json.dumps(r) for r in recs]
    cut = draw(st.integers(1, len(lines[i]) - 1))
    lines[i] = lines[i][:cut]
    return recs, lines


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=structural_edit())
def test_any_structural_edit_is_exit_2_never_a_traceback(tmp_path_factory, edit):
    recs, raw = edit
    d = tmp_path_factory.mktemp("l")
    good, bad = write(d / "good", records()), write(d / "bad", recs, raw)
    v = compare(read_ledger(good), read_ledger(bad))
    assert v.exit_code == 2 and v.status == "invalid", (v.status, v.problems, recs)
    assert f"{LEDGER_FILE}:" in v.problems[0]


def test_a_consistent_hash_change_is_a_divergence_not_a_schema_error(tmp_path):
    recs = records()
    recs[2]["tensors"]["weights"][1][1] = "xxh3_128:" + "f" * 32
    recs[2]["hashes"]["weights"] = combine(dict(recs[2]["tensors"]["weights"]))
    recs[3]["final_weights"] = recs[2]["hashes"]["weights"]
    v = verify(str(write(tmp_path / "a", records())), str(write(tmp_path / "b", recs)))
    assert v.status == "diverged" and (v.first.iteration, v.first.phase) == (1, "weights")
    assert v.first.tensors == ["layer1.weight"]


# ---------------------------------------------------------------- semantic and non-semantic config keys


def test_non_semantic_keys_exist_and_do_not_change_the_config_hash():
    base = load_config("tiny-cpu")
    flat = json.dumps(base.model_dump(mode="json"))
    for key in NON_SEMANTIC:
        assert key.rsplit(".", 1)[-1] in flat, key
    assert (
        base.config_hash()
        == load_config(
            "tiny-cpu", overrides=["checkpoint.keep=5", "checkpoint.every=1", "ledger.keep_step_data=false"]
        ).config_hash()
    )
    assert base.config_hash() != load_config("tiny-cpu", overrides=["resources.cpu_threads=2"]).config_hash()


def test_a_non_semantic_difference_is_identical_and_says_so(tmp_path):
    a = write(tmp_path / "a", records())
    b = write(tmp_path / "b", records(**{"checkpoint.keep": 5}))
    v = verify(str(a), str(b))
    assert v.status == "identical" and v.exit_code == 0
    assert v.config_diff == [] and v.config_diff_other == ["checkpoint.keep: 2 -> 5"]
    assert format_text(v).startswith("IDENTICAL (configs differ only in non-semantic keys: checkpoint.keep)")


def test_a_semantic_difference_is_never_identical_and_is_named_first(tmp_path):
    a = write(tmp_path / "a", records())
    b = write(tmp_path / "b", records(**{"train.lr": 0.5, "checkpoint.keep": 5}))
    v = verify(str(a), str(b))  # every recorded hash equal: still two different experiments, and not DIVERGED
    assert v.status == "different_experiments" and v.exit_code == 2
    assert v.first.phase == "config" and v.first.iteration is None
    assert v.config_diff == ["train.lr: 0.001 -> 0.5"]
    text = format_text(v).splitlines()
    assert text[0].startswith("NOT COMPARABLE (same hashes, different experiments)") and "DIVERGED" not in text[0]
    assert text[1] == "semantic config differences: train.lr: 0.001 -> 0.5", text
    assert not any("first divergence" in line for line in text), text
    assert v.likely_cause.startswith("the two runs were configured differently in semantic keys")


def test_different_artifacts_are_named_first_with_both_hashes(tmp_path):
    a = write(tmp_path / "a", records())
    recs = records()
    recs[0]["artifacts"]["model"]["sha256"] = hex_digest("other model")
    recs[1]["hashes"]["prompts"] = hex_digest("x")
    v = verify(str(a), str(write(tmp_path / "b", recs)))
    assert v.status == "diverged" and (v.first.iteration, v.first.phase) == (0, "prompts")
    assert v.artifact_diff == [f"model.sha256: {hex_digest('model')!r} -> {hex_digest('other model')!r}"]
    assert v.likely_cause.startswith("the runs started from different artifacts (model.sha256:")


def test_a_run_compared_with_itself_or_a_copy_is_the_same_run_never_identical(tmp_path):
    recs = records()
    a = write(tmp_path / "a", recs)
    for other in (a, write(tmp_path / "copy", recs)):
        v = verify(str(a), str(other))
        assert v.status == "same_run" and v.exit_code == 2, v.problems
        assert format_text(v).startswith("SAME RUN (nothing was reproduced)")
        assert "nothing was reproduced" in v.problems[0]
    edited = [dict(r) for r in recs]  # an edited copy is compared byte for byte: it diverged
    edited[2] = json.loads(json.dumps(recs[2]))
    edited[2]["hashes"]["loss"] = hex_digest("edited")
    v = verify(str(a), str(write(tmp_path / "edited", edited)))
    assert v.status == "diverged" and (v.first.iteration, v.first.phase) == (1, "loss")


SCHEDULE_ONLY_KEYS = {
    "rollout.sglang.cuda_graph_max_bs": 8,
    "rollout.sglang.disable_cuda_graph": True,
    "rollout.sglang.max_running_requests": 16,
    "rollout.sglang.chunked_prefill_size": 512,
}


@pytest.mark.parametrize("key,value", SCHEDULE_ONLY_KEYS.items())
def test_schedule_only_keys_are_non_semantic_only_with_determinism_on(tmp_path, key, value):
    on = verify(str(write(tmp_path / "a", records())), str(write(tmp_path / "b", records(**{key: value}))))
    assert on.status == "identical" and on.config_diff == [] and on.config_diff_other[0].startswith(key), on
    assert load_config("tiny-cpu").config_hash() == load_config("tiny-cpu", overrides=[f"{key}={value}"]).config_hash()
    off = {"determinism.enabled": False}
    v = verify(str(write(tmp_path / "c", records(**off))), str(write(tmp_path / "d", records(**off, **{key: value}))))
    assert v.status == "different_experiments" and v.config_diff[0].startswith(key), v
    cfgs = [load_config("tiny-cpu", overrides=["determinism.enabled=false", *x]) for x in ([], [f"{key}={value}"])]
    assert cfgs[0].config_hash() != cfgs[1].config_hash()


def test_memory_fraction_stays_semantic_with_determinism_on(tmp_path):
    # a smaller KV pool can make SGLang retract a request and re-prefill it: another kernel
    key = "rollout.sglang.mem_fraction_static"
    v = verify(str(write(tmp_path / "a", records())), str(write(tmp_path / "b", records(**{key: 0.2}))))
    assert v.status == "different_experiments" and v.config_diff[0].startswith(key)


def _with_schedule(recs: list, schedule: dict | None) -> list:
    recs[0]["schedule"] = schedule
    return recs


PERTURBED = {"perturbed": True, "order_seed": 7, "submissions": 3, "engine_args": {"max_running_requests": 16}}
PLAIN = {"perturbed": False, "order_seed": None, "submissions": 1, "engine_args": {}}


def test_the_verdict_names_run_bs_schedule_and_what_identical_certifies(tmp_path):
    a = write(tmp_path / "a", _with_schedule(records(), PLAIN))
    b = write(tmp_path / "b", _with_schedule(records(), PERTURBED))
    v = verify(str(a), str(b))
    assert v.status == "identical" and v.schedule["A"] == "as given, one submission per iteration"
    assert v.schedule["B"] == (
        "requests shuffled per iteration (order seed 7); sent in 3 submissions; engine limits max_running_requests=16"
    )
    text = format_text(v)
    assert "run B requests shuffled" in text and "the engine is batch-invariant here" in text
    same = verify(str(a), str(write(tmp_path / "c", _with_schedule(records(), PLAIN))))
    assert "not batch invariance" in format_text(same)


def test_a_rollout_that_differs_under_another_schedule_blames_batch_variance(tmp_path):
    a = write(tmp_path / "a", _with_schedule(records(), PLAIN))
    recs = _with_schedule(records(), PERTURBED)
    recs[1]["hashes"]["rollout_tokens"] = hex_digest("other tokens")
    v = verify(str(a), str(write(tmp_path / "b", recs)))
    assert v.status == "diverged" and (v.first.iteration, v.first.phase) == (0, "rollout_tokens")
    assert "run B sent its requests differently" in v.likely_cause and "not batch-invariant" in v.likely_cause


def test_the_phases_two_records_differ_in_put_the_eval_between_the_sync_and_the_rollout():
    """One rule for verify and for a resume's recomputed records (ledger.differing_phases)."""
    from detrl.ledger import differing_phases

    a = records()[1]
    b = json.loads(json.dumps(a))
    assert differing_phases(a, b) == []
    a["eval"], b["eval"] = {"tokens": hex_digest("x")}, {"tokens": hex_digest("y")}
    b["hashes"]["rewards"] = hex_digest("other")
    assert differing_phases(a, b) == ["eval", "rewards"]
    b["hashes"]["policy_weights"] = hex_digest("other")
    assert differing_phases(a, b) == ["policy_weights", "eval", "rewards"]
    del b["eval"]
    assert differing_phases(a, b)[:2] == ["policy_weights", "eval"]  # evaluated in one run only


def test_rows_cut_from_a_ragged_array_are_the_rows_it_was_made_of():
    import numpy as np

    from detrl.ledger import ragged, unragged

    rows = [[3, 1], [], [4, 1, 5], [9]]
    flat, lengths = ragged(rows, np.int64)
    assert [r.tolist() for r in unragged(flat, lengths)] == rows
    assert unragged(np.zeros(0, np.int64), []) == []
