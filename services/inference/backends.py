"""Backends run a batch through a network: eager PyTorch, TorchScript or ONNX Runtime.

A backend takes a float32 batch (N, 3, H, W) and returns class probabilities (N, C); networks are
wrapped with a softmax before they reach a backend, so every backend returns comparable scores.
"""

from __future__ import annotations

import logging
import os
import queue
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class DeviceUnavailableError(RuntimeError):
    """The requested device is missing and --strict-device forbids falling back."""


class Backend(Protocol):
    name: str
    device: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Return class probabilities (N, C) for a preprocessed batch (N, 3, H, W)."""
        ...


def resolve_device(requested: str, strict: bool, cuda_available: bool) -> str:
    """Pick 'cuda' or 'cpu' for a request of auto/cpu/cuda, saying why in the log."""
    if requested == "cpu":
        return "cpu"
    if cuda_available:
        log.info("device: CUDA is available, running on the GPU")
        return "cuda"
    if requested == "cuda":
        if strict:
            raise DeviceUnavailableError("--device cuda was asked for but no CUDA GPU is usable")
        log.warning(
            "device: --device cuda asked for but no CUDA GPU is usable; falling back to CPU"
        )
    else:
        log.info("device: no CUDA GPU found, running on the CPU")
    return "cpu"


def cuda_available(backend: str) -> bool:
    """Whether the named backend can run on a CUDA GPU here."""
    if backend == "onnx":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    import torch

    return torch.cuda.is_available()


def threads_per_call(workers: int, threads: int) -> int:
    """Threads one model call may use: as given, or (0) the cores shared among the workers.

    On 2 CPU cores two single-threaded workers beat one call over both cores (docs/benchmarks.md):
    a call's threads wait for each other at every operator, so whenever decoding or gRPC takes
    one core the other idles too; a single-threaded call just runs a little later.
    """
    return threads or max(1, (os.cpu_count() or 1) // workers)


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

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            inputs = torch.from_numpy(batch).to(self.device)
            return self._module(inputs).float().cpu().numpy()


class OnnxBackend:
    """ONNX Runtime; needs no torch, so the slim serving image can use it.

    `sessions` is how many calls may run at once: each gets a session, with an intra-op thread
    pool, of its own, since concurrent calls on one session would share one pool.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "cpu",
        threads: int = 0,
        sessions: int = 1,
    ) -> None:
        import onnxruntime as ort

        self.device = device
        self.name = "onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Without this the intra-op threads spin for a while after each call, burning the CPU
        # that decoding and gRPC need between batches: at concurrency 8 on 2 cores the model's
        # threads took 9.1-9.8 ms of CPU per image with spinning and 7.0-7.5 without, against
        # 6.5-7.1 bare (docs/benchmarks.md). Back-to-back calls measured no slower.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self._idle_sessions: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for _ in range(sessions):
            session = ort.InferenceSession(str(model_path), options, providers=providers)
            self._idle_sessions.put(session)
        self._input_name = session.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> np.ndarray:
        session = self._idle_sessions.get()
        try:
            return session.run(None, {self._input_name: batch})[0]
        finally:
            self._idle_sessions.put(session)
