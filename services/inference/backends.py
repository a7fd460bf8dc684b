"""Backends run a batch through a network: eager PyTorch, TorchScript or ONNX Runtime.

A backend takes a float32 batch (N, 3, H, W) and returns class probabilities (N, C); networks are
wrapped with a softmax before they reach a backend, so every backend returns comparable scores.
"""

from __future__ import annotations

import importlib.metadata
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from common.cpus import usable_cpus
from common.devices import DeviceUnavailableError, nvidia_gpu_present

if TYPE_CHECKING:
    import torch


class Backend(Protocol):
    name: str
    device: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Return class probabilities (N, C) for a preprocessed batch (N, 3, H, W)."""
        ...

    def warm_up(self, batches: list[np.ndarray]) -> None:
        """Run each batch on everything that will serve calls: first calls allocate."""
        ...


def cuda_available(backend: str) -> bool:
    """Whether the named backend can run on a CUDA GPU here."""
    if backend == "onnx":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    import torch

    return torch.cuda.is_available()


def cuda_missing_reason(backend: str) -> str:
    """Why `backend` cannot use CUDA on a machine whose driver lists a GPU ("" where none is
    listed): the default install's onnxruntime is the CPU build, and the log said "no CUDA GPU
    found" of a working GPU."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if hidden or not nvidia_gpu_present():  # none, or kept from this process on purpose
        return ""
    if backend == "onnx":
        # Both builds write the same `onnxruntime` package: the GPU one installed over the CPU
        # one mixed their files, and a later install of the pins put the CPU build back.
        version = _installed_version("onnxruntime")
        return (
            "this machine has an NVIDIA GPU, but the installed onnxruntime is the CPU build: "
            f"replace it (`pip uninstall onnxruntime && pip install onnxruntime-gpu=={version}`),"
            " or serve with --backend eager or torchscript"
        )
    return "this machine has an NVIDIA GPU, but torch cannot use it (a CPU build of torch?)"


def _installed_version(distribution: str) -> str:
    """`distribution`'s installed version ("<version>" where it is not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "<version>"


def threads_per_call(workers: int, threads: int) -> int:
    """Threads one model call may use: as given, or (0) the cores shared among the workers.

    On 2 CPU cores two single-threaded workers beat one call over both cores (docs/benchmarks.md):
    a call's threads wait for each other at every operator, so whenever decoding or gRPC takes
    one core the other idles too; a single-threaded call just runs a little later.
    """
    return threads or max(1, usable_cpus() // workers)


class TorchBackend:
    """Eager PyTorch, or a frozen TorchScript trace of the same network."""

    def __init__(
        self,
        network: torch.nn.Module,
        input_shape: tuple[int, int, int],
        *,
        torchscript: bool,
        device: str = "cpu",
        threads: int = 0,
    ) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device
        self.name = "torchscript" if torchscript else "eager"
        module = network.to(self.device).eval()
        if torchscript:
            example = torch.zeros((1, *input_shape), device=self.device)
            # TorchScript is deprecated upstream, but it is what this backend is asked for.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.freeze(torch.jit.trace(module, example).eval())
        self._module = module
        self._torch = torch

    def warm_up(self, batches: list[np.ndarray]) -> None:
        for batch in batches:
            self.run(batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            inputs = torch.from_numpy(batch).to(self.device)
            return self._module(inputs).float().cpu().numpy()


# A call takes the wide session only after this long without overlapping calls: under load the
# workers' calls overlap all the time, and a wide call amid them would leave 3 threads on 2 cores
# waiting for each other (the ratio fell from 0.76-0.79 to 0.65-0.75; docs/benchmarks.md).
LONE_CALL_QUIET_S = 1.0


class OnnxBackend:
    """ONNX Runtime; needs no torch, so the slim serving image can use it.

    `sessions` is how many calls may run at once, each on a session with `threads` intra-op
    threads of its own (concurrent calls on one session would share one pool). With
    `lone_call_threads` above `threads`, a call made while no other has run beside it for a
    while takes a wider session instead: a lone request then gets every core (5.2 ms at
    concurrency 1 on 2 cores, against 9.1 single-threaded), while under load the calls split the
    cores (docs/benchmarks.md).
    """

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "cpu",
        threads: int = 0,
        sessions: int = 1,
        lone_call_threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.device = device
        self.name = "onnx"
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")

        def new_session(intra_op_threads: int) -> ort.InferenceSession:
            options = ort.SessionOptions()
            options.intra_op_num_threads = intra_op_threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Without this the intra-op threads spin for a while after each call, burning the
            # CPU that decoding and gRPC need between batches: at concurrency 8 on 2 cores the
            # model's threads took 9.1-9.8 ms of CPU per image with spinning and 7.0-7.5
            # without, against 6.5-7.1 bare (docs/benchmarks.md). Back-to-back calls measured
            # no slower.
            options.add_session_config_entry("session.force_spinning_stop", "1")
            return ort.InferenceSession(str(model_path), options, providers=providers)

        self._sessions = [new_session(threads) for _ in range(sessions)]
        # Last in, first out: a call takes the session that ran last, whose weights and arena
        # are still in the caches. First in, first out rotated the calls over every session (3
        # on 2 cores, where 2 calls run at once) and did 0.88-0.99x the img/s at every
        # concurrency in two sweeps (docs/benchmarks.md, "Sessions taken last in, first out").
        self._idle_sessions: queue.LifoQueue[ort.InferenceSession] = queue.LifoQueue()
        for session in self._sessions:
            self._idle_sessions.put(session)
        wide = sessions > 1 and device == "cpu" and lone_call_threads > max(threads, 1)
        self._lone_call_session = new_session(lone_call_threads) if wide else None
        self._running_calls = 0
        self._last_overlap = -LONE_CALL_QUIET_S  # when a call last started beside another
        self._calls_lock = threading.Lock()
        first = self._sessions[0]
        if self.device == "cuda" and "CUDAExecutionProvider" not in first.get_providers():
            # ONNX Runtime falls back to the CPU by itself, saying so only in its own log.
            raise DeviceUnavailableError(
                "ONNX Runtime could not start its CUDA provider (no usable GPU, or CUDA and "
                "cuDNN not as it was built for); the model would run on the CPU"
            )
        self._input_name = first.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(first.get_modelmeta().custom_metadata_map)

    def warm_up(self, batches: list[np.ndarray]) -> None:
        lone = [self._lone_call_session] if self._lone_call_session is not None else []
        for session in [*self._sessions, *lone]:
            for batch in batches:
                session.run(None, {self._input_name: batch})

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._lone_call_session is None:  # nothing to choose: no overlap bookkeeping
            return self._run_on_idle_session(batch)
        with self._calls_lock:
            now = time.monotonic()
            if self._running_calls > 0:
                self._last_overlap = now
            alone = self._running_calls == 0 and now - self._last_overlap > LONE_CALL_QUIET_S
            self._running_calls += 1
        try:
            if alone:
                return self._lone_call_session.run(None, {self._input_name: batch})[0]
            return self._run_on_idle_session(batch)
        finally:
            with self._calls_lock:
                self._running_calls -= 1

    def _run_on_idle_session(self, batch: np.ndarray) -> np.ndarray:
        session = self._idle_sessions.get()
        try:
            return session.run(None, {self._input_name: batch})[0]
        finally:
            self._idle_sessions.put(session)
