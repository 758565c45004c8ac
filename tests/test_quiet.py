"""Known third-party noise (detrl.quiet) leaves the logs; every other line stays."""

import logging
import warnings

from detrl import quiet


def test_known_noise_is_filtered_and_real_warnings_are_kept():
    quiet.install()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet._installed = False
        quiet.install()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning, stacklevel=1)
        warnings.warn("something a user must see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user must see"]


# lines of an H200 nightly's log (benchmarks/results/h200-exact-runb-tile-hang-smollm2-flow.log), by logger
SGLANG_NOTES = {
    "sglang.srt.arg_groups.overrides": "Sampling backend is set to pytorch for deterministic inference.",
    "sglang.srt.server_args": "Currently radix cache is not compatible with flashinfer attention backend for "
    "deterministic inference. It will be supported in the future.",
    "sglang.srt.parser.template_manager": "No HuggingFace chat template found",
    "sglang.srt.utils.common": "Fail to set RLIMIT_NOFILE: current limit exceeds maximum limit",
    "sglang.srt.models.registry": "Ignore import error when loading sglang.srt.models.inkling: "
    "No module named 'helion'",
}


def test_sglangs_notes_on_deterministic_mode_are_filtered_and_its_other_lines_kept(caplog):
    quiet.install()
    with caplog.at_level(logging.INFO):
        for name, message in SGLANG_NOTES.items():
            logging.getLogger(name).warning(message)
        logging.getLogger("sglang.srt.models.registry").warning(
            "Ignore import error when loading sglang.srt.models.llama: No module named 'x'"
        )
        logging.getLogger("sglang.srt.server_args").warning("Not enough memory for the KV cache")
    assert [r.getMessage() for r in caplog.records] == [
        "Ignore import error when loading sglang.srt.models.llama: No module named 'x'",
        "Not enough memory for the KV cache",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet._installed = False
        quiet.install()
        for text in (
            "barrier(): using the device under current context. You can specify `device_id` in "
            "`init_process_group` to mute this warning.",
            "Warning only once for all operators,  other operators may also be overridden.\n  Overriding a "
            "previously registered kernel for the same operator and the same dispatch key",
        ):
            warnings.warn(text, UserWarning, stacklevel=1)
    assert caught == []
