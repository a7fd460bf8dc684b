"""`--batching auto`: batch only where the model does measurably more images/s in batches."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.inference.backends import OnnxBackend
from services.inference.batcher import BatchingChoice, choose_batch_size

MIN_SPEEDUP = 1.25


class _CostModel:
    """A stand-in model whose cost per call we set: a fixed part per call plus one per image.

    A stub, not a real backend, because a GPU (where a call's cost barely grows with its batch)
    cannot be produced on this machine; the tests with real ONNX models below cover the CPU side.
    It sleeps, as a device call releases the GIL while it runs.
    """

    def __init__(self, per_call_s: float, per_image_s: float) -> None:
        self.per_call_s = per_call_s
        self.per_image_s = per_image_s

    def run(self, batch_size: int) -> None:
        time.sleep(self.per_call_s + batch_size * self.per_image_s)


def test_auto_batches_when_the_cost_per_image_falls_with_batch_size() -> None:
    gpu_like = _CostModel(per_call_s=0.004, per_image_s=0.0002)  # batch 8: 5.6 ms for 8 images
    choice = choose_batch_size("auto", 8, gpu_like.run, callers=2, min_speedup=MIN_SPEEDUP)
    assert choice.max_batch_size == 8, choice.reason
    assert choice.images_per_s_at_max > 3 * choice.images_per_s_at_1, choice
    assert "pays" in choice.reason and "not" not in choice.reason


def test_auto_dispatches_directly_when_an_image_costs_the_same_in_any_batch() -> None:
    cpu_like = _CostModel(per_call_s=0.0, per_image_s=0.002)
    choice = choose_batch_size("auto", 8, cpu_like.run, callers=2, min_speedup=MIN_SPEEDUP)
    assert choice.max_batch_size == 1, choice.reason
    assert "does not pay" in choice.reason


class _StallOnNewSize(_CostModel):
    """A per-image model whose first call at a new batch size stalls (a reallocation, or a
    machine busy for a moment at start-up)."""

    def __init__(self, per_image_s: float, stall_s: float) -> None:
        super().__init__(0.0, per_image_s)
        self.stall_s = stall_s
        self.last_size = 0

    def run(self, batch_size: int) -> None:
        if batch_size != self.last_size:
            self.last_size = batch_size
            time.sleep(self.stall_s)
        super().run(batch_size)


def test_a_batch_slower_than_the_window_is_timed_over_several_calls() -> None:
    """A batch call longer than the timing window (an eager model's batch of 8 on a busy CPU)
    was timed by that one call, and the first at a new size may stall: batch 8 was judged
    several times faster than batch 1 on a CPU, for the server's whole life."""
    model = _StallOnNewSize(per_image_s=0.03, stall_s=0.3)  # batch 8: 0.24 s a call
    choice = choose_batch_size("auto", 8, model.run, callers=1, min_speedup=MIN_SPEEDUP)
    assert choice.max_batch_size == 1, choice.reason
    assert choice.images_per_s_at_max == pytest.approx(1 / 0.03, rel=0.2), choice
    assert choice.images_per_s_at_1 == pytest.approx(1 / 0.03, rel=0.2), choice


@pytest.mark.parametrize(("mode", "expected"), [("on", 8), ("off", 1)])
def test_on_and_off_are_obeyed_without_measuring(mode: str, expected: int) -> None:
    def must_not_run(batch_size: int) -> None:
        raise AssertionError("on and off must not spend start-up time measuring")

    choice = choose_batch_size(mode, 8, must_not_run, callers=2, min_speedup=MIN_SPEEDUP)
    assert choice.max_batch_size == expected


def _onnx_model(path: Path, nodes: list, inputs: int, outputs: int, weights=()) -> Path:
    graph = helper.make_graph(
        nodes,
        "cost",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", outputs])],
        initializer=list(weights),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _choose_on_real_model(path: Path, features: int) -> BatchingChoice:
    """Run auto's measurement on a real ONNX Runtime backend in the server's shape."""
    backend = OnnxBackend(path, threads=1, sessions=2)
    inputs = {size: np.ones((size, features), np.float32) for size in (1, 8)}
    backend.warm_up(list(inputs.values()))
    return choose_batch_size(
        "auto", 8, lambda size: backend.run(inputs[size]), callers=2, min_speedup=MIN_SPEEDUP
    )


def test_auto_batches_a_real_model_whose_weights_dominate(tmp_path: Path) -> None:
    """A real ONNX model, a large fully connected layer: batch 1 reads all 16 MB of weights for
    one image, batch 8 for eight (a matrix-vector against a matrix-matrix product), so on any
    CPU the cost per image falls with the batch, as a network's does on a GPU."""
    size = 2048
    weights = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((size, size), np.float32), "w"
    )
    path = _onnx_model(
        tmp_path / "dense.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], size, size,
        [weights],
    )  # fmt: skip
    choice = _choose_on_real_model(path, size)
    assert choice.max_batch_size == 8, choice.reason


def test_auto_does_not_batch_a_real_model_whose_cost_is_per_image(tmp_path: Path) -> None:
    """A real ONNX model that does the same elementwise work for every input value: a batch
    of 8 costs 8 times one image, so holding requests for a batch buys nothing."""
    features = 1 << 20
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Sqrt", ["r"], ["s"]),
        helper.make_node("Exp", ["s"], ["e"]),
        helper.make_node("ReduceMax", ["e"], ["y"], keepdims=1, axes=[1]),  # opset 17: attribute
    ]
    path = _onnx_model(tmp_path / "elementwise.onnx", nodes, features, 1)
    choice = _choose_on_real_model(path, features)
    assert choice.max_batch_size == 1, choice.reason
