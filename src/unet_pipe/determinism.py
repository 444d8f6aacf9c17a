"""What is bit-identical, and what only close, across the run-time choices of each stage.

One table, :data:`STATEMENTS`: each row says, for one stage, which choices leave the result
bit-identical (or within which tolerance) in which precision, and names the tests that hold
it.  ``--help`` of ``predict``, ``postprocess`` and ``train`` prints the rows of its stage
(:func:`help_text`); the docs carry :func:`markdown_table`; a test checks that every named
test exists, so no statement stands without one.  Only what is tested is stated: the GPU
rows promise tolerances, not bits (cuDNN chooses its kernels per shape and device).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Statement:
    """One promise: ``stage``, the ``precision`` it holds in, its ``text``, the ``tests`` holding it."""

    stage: str
    precision: str
    text: str
    tests: tuple[str, ...]


STATEMENTS: tuple[Statement, ...] = (
    Statement(
        "predict", "CPU float32 and bfloat16",
        "probabilities are bit-identical across --workers, --threads, the Dask scheduler (local threads or "
        "--scheduler dask.distributed), --shard runs and resumes after a kill (which reuse the stored plan), for "
        "one plan (--tile, --block, --batch); the defaults of these three follow the free memory, so give them "
        "to fix the plan",
        ("tests/test_determinism.py::test_predict_is_bit_identical_across_workers_and_threads",
         "tests/test_predict.py::test_distributed_scheduler",
         "tests/test_predict.py::test_shards_then_finalize_equal_a_single_run",
         "tests/test_predict.py::test_sigkill_then_restart_is_bit_identical"),
    ),
    Statement(
        "predict", "CPU float32",
        "another --tile, --block or --batch is not bit-identical (the tiles or the batches a tile is computed "
        "in change the order of the arithmetic): each result equals the whole-slice forward pass within 1e-5",
        ("tests/test_predict.py::test_tiled_equals_whole_slice_forward",),
    ),
    Statement(
        "predict", "CPU bfloat16",
        "another --tile, --batch or --block leaves at least 99 % of the probabilities bit-identical to the "
        "whole-slice bfloat16 forward pass and the rest within 0.03",
        ("tests/test_predict.py::test_tiled_equals_whole_slice_forward",
         "tests/test_precision.py::test_bf16_reruns_are_bit_identical_and_tiling_invariant"),
    ),
    Statement(
        "predict", "CPU bfloat16 vs float32",
        "the two precisions agree within 0.03",
        ("tests/test_precision.py::test_bf16_agrees_with_fp32_within_the_stated_tolerance",),
    ),
    Statement(
        "predict", "GPU",
        "nothing is promised bit-identical; float32 agrees with the CPU within 1e-4, bfloat16/float16 within 0.02",
        ("tests/test_predict.py::test_cuda_gives_the_cpu_result",),
    ),
    Statement(
        "postprocess", "CPU (NumPy/SciPy; no precision choice)",
        "2d: each slice on its own (no block or worker choice); a resumed run writes the same ids as an "
        "uninterrupted one",
        ("tests/test_postprocess.py::test_postprocess_resumes_with_identical_ids",),
    ),
    Statement(
        "postprocess", "CPU (NumPy/SciPy; no precision choice)",
        "3d: instance ids are bit-identical across --threads and sharded --step runs, for one --block",
        ("tests/test_instances3d.py::test_worker_count_does_not_change_the_result",
         "tests/test_instances3d.py::test_sharded_steps_equal_one_run",
         "tests/test_determinism.py::test_3d_watershed_ids_are_bit_identical_across_threads"),
    ),
    Statement(
        "postprocess", "CPU (NumPy/SciPy; no precision choice)",
        "3d: another --block gives the same objects as labelling the whole volume at once (the same voxels "
        "grouped the same way, ids 1..N), though the ids may be numbered differently; the watershed does so "
        "wherever every cell near a block fits in the block grown by --halo",
        ("tests/test_instances3d.py::test_equals_whole_volume_label",
         "tests/test_instances3d.py::test_watershed_equals_whole_volume_within_the_halo_rule"),
    ),
    Statement(
        "train", "CPU float32 and bfloat16",
        "two runs with one seed and one --threads give bit-identical checkpoints and logs (the default is every "
        "core this process may use: give --threads to fix it); --resume continues bit-identically to an "
        "uninterrupted run",
        ("tests/test_train.py::test_two_runs_are_bit_identical_and_csv_is_complete",
         "tests/test_train.py::test_resume_is_bit_identical",
         "tests/test_precision.py::test_bf16_training_reruns_bit_identically_and_records_its_precision",
         "tests/test_determinism.py::test_bf16_training_resume_is_bit_identical"),
    ),
    Statement(
        "train", "CPU float32",
        "another --threads changes the weights by round-off only (at most 1e-5 after the test's 6 steps), not "
        "bit-identically",
        ("tests/test_determinism.py::test_float32_training_threads_change_round_off_only",),
    ),
    Statement(
        "train", "GPU",
        "nothing is promised bit-identical (mixed precision with a loss scaler; cuDNN kernels)",
        (),
    ),
)


def help_text(stage: str) -> str:
    """The determinism paragraph of ``unet-pipe STAGE --help``."""
    rows = [f"{s.precision}: {s.text}." for s in STATEMENTS if s.stage == stage]
    return "Determinism. " + " ".join(rows)


def markdown_table() -> str:
    """The table of every statement, for the docs (stage, precision, statement, tests)."""
    lines = ["| stage | precision | statement | tests |", "|---|---|---|---|"]
    for s in STATEMENTS:
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in s.tests) or "none (nothing promised)"
        lines.append(f"| {s.stage} | {s.precision} | {s.text} | {tests} |")
    return "\n".join(lines) + "\n"
