"""`services/inference/batching_memo.py`: `--batching auto`'s verdict kept for the next start.
tests/test_service.py checks that a second `vidflow serve` recalls it instead of measuring."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.inference.batcher import BatchingChoice
from services.inference.batching_memo import (
    MAX_AGE,
    MEMO_FILE,
    choice_key,
    recalled_choice,
    remember_choice,
)

PARTS = {"model": "efficientnet_lite0", "weights": "ab12", "backend": "onnx", "device": "cpu",
         "workers": 3, "threads": 0, "max_batch_size": 8, "min_speedup": 1.25,
         "onnx_file": None}  # fmt: skip
MEASURED = BatchingChoice(1, "--batching auto: batch 8 does 1.02x ... does not pay", 180.0, 184.0)
MIN = 1.25  # --batching-min-speedup


def test_a_kept_verdict_is_recalled_with_when_it_was_measured(tmp_path: Path) -> None:
    key = choice_key(**PARTS)
    assert recalled_choice(tmp_path, key, MIN) is None  # nothing kept yet
    remember_choice(tmp_path, key, MEASURED)
    recalled = recalled_choice(tmp_path, key, MIN)
    assert recalled is not None
    assert recalled.max_batch_size == 1
    assert (recalled.images_per_s_at_1, recalled.images_per_s_at_max) == (180.0, 184.0)
    assert recalled.reason.startswith(MEASURED.reason)
    assert f"kept in {MEMO_FILE}" in recalled.reason


def test_anything_the_verdict_depends_on_changes_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = choice_key(**PARTS)
    from services.inference import batching_memo  # the machine's part: its CPUs and their model

    machine_parts = (
        ("usable_cpus", lambda: 32),
        ("_cpu_model", lambda: "another CPU"),
        ("_runtime_version", lambda backend: "another onnxruntime"),  # after an upgrade
    )
    for name, value in machine_parts:
        with monkeypatch.context() as machine:
            machine.setattr(batching_memo, name, value)
            assert choice_key(**PARTS) != key, name
    assert choice_key(**PARTS) == key  # the same model, settings and machine: the same key
    for name, other in [("weights", "cd34"), ("device", "cuda"), ("workers", 2),
                        ("max_batch_size", 16), ("threads", 1), ("min_speedup", 1.5),
                        ("model", "resnet50"), ("backend", "torchscript"),
                        ("onnx_file", ["/models/m.onnx", 1234, 5678])]:  # fmt: skip
        assert choice_key(**{**PARTS, name: other}) != key, name
    remember_choice(tmp_path, key, MEASURED)
    assert recalled_choice(tmp_path, choice_key(**{**PARTS, "device": "cuda"}), MIN) is None
    other_key = choice_key(**{**PARTS, "max_batch_size": 16})
    remember_choice(tmp_path, other_key, BatchingChoice(16, "--batching auto: pays", 100, 300))
    assert recalled_choice(tmp_path, key, MIN).max_batch_size == 1  # both kept side by side
    assert recalled_choice(tmp_path, other_key, MIN).max_batch_size == 16


def test_a_damaged_memo_is_measured_again_and_replaced(tmp_path: Path) -> None:
    key = choice_key(**PARTS)
    (tmp_path / MEMO_FILE).write_text('{"cut short')
    assert recalled_choice(tmp_path, key, MIN) is None
    (tmp_path / MEMO_FILE).write_text(json.dumps({key: {"choice": {"max_batch": 1}}}))
    assert recalled_choice(tmp_path, key, MIN) is None  # another shape: a miss, not an error
    (tmp_path / MEMO_FILE).write_text(
        json.dumps({key: {"choice": {"max_batch_size": 1, "reason": "r"}}})
    )
    assert recalled_choice(tmp_path, key, MIN) is None  # no date, no figures: a miss too
    remember_choice(tmp_path, key, MEASURED)
    assert recalled_choice(tmp_path, key, MIN).max_batch_size == 1


def test_a_memo_that_cannot_be_written_only_costs_the_next_start_its_time(
    tmp_path: Path, caplog
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with caplog.at_level(logging.WARNING):
        remember_choice(not_a_folder / "cache", choice_key(**PARTS), MEASURED)
    assert "could not keep the batching verdict" in caplog.text
    assert recalled_choice(not_a_folder / "cache", choice_key(**PARTS), MIN) is None


def test_an_old_verdict_or_one_near_the_line_is_measured_again(tmp_path: Path) -> None:
    """Kept for good, one noisy measurement would decide every later start."""
    key = choice_key(**PARTS)
    remember_choice(tmp_path, key, MEASURED)
    memo = json.loads((tmp_path / MEMO_FILE).read_text())
    old = datetime.now(UTC) - MAX_AGE - timedelta(hours=1)
    memo[key]["measured_at"] = old.isoformat(timespec="seconds")
    (tmp_path / MEMO_FILE).write_text(json.dumps(memo))
    assert recalled_choice(tmp_path, key, MIN) is None

    near = BatchingChoice(1, "--batching auto: batch 8 does 1.22x ... does not pay", 100, 122)
    remember_choice(tmp_path, key, near)  # 1.22x against the 1.25x line: within 5 %
    assert recalled_choice(tmp_path, key, MIN) is None
    clear = BatchingChoice(1, "--batching auto: batch 8 does 1.15x ... does not pay", 100, 115)
    remember_choice(tmp_path, key, clear)
    assert recalled_choice(tmp_path, key, MIN) is not None


def test_servers_starting_together_keep_each_other_s_verdicts(tmp_path: Path) -> None:
    """Two servers on one cache read the memo, each added its verdict and wrote back what it
    had read: the last write dropped the other's, measured again at the next start."""
    keys = [f"server-{index}" for index in range(16)]
    barrier = threading.Barrier(len(keys))

    def remember(key: str) -> None:
        barrier.wait()
        remember_choice(tmp_path, key, MEASURED)

    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        list(pool.map(remember, keys))
    assert all(recalled_choice(tmp_path, key, MIN) is not None for key in keys)


def test_a_verdict_measured_on_one_gpu_model_is_not_another_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key named the CPU but not the GPU: a cache moved to (or shared with) a machine of
    another GPU recalled a verdict measured elsewhere. No GPU here: the driver's listing is
    made up in a folder of the test's own."""
    import services.inference.batching_memo as memo

    gpu = tmp_path / "gpus" / "0000:01:00.0"
    gpu.mkdir(parents=True)
    monkeypatch.setattr(memo, "NVIDIA_GPUS", tmp_path / "gpus")
    keys = {}
    for model in ("NVIDIA H100 80GB HBM3", "NVIDIA L4"):
        (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ: 16\n")
        keys[model] = (choice_key(**{**PARTS, "device": "cuda"}), choice_key(**PARTS))
    (h100_cuda, h100_cpu), (l4_cuda, l4_cpu) = keys.values()
    assert h100_cuda != l4_cuda and h100_cpu == l4_cpu  # the CPU's verdict needs no GPU
