"""Turns settings into a `ServedModel`: the network behind the chosen backend, and its facts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cpus import usable_cpus
from common.devices import DeviceUnavailableError, choose_device
from services.inference.backends import (
    Backend,
    OnnxBackend,
    TorchBackend,
    cuda_available,
    cuda_missing_reason,
    threads_per_call,
)
from services.inference.onnx_export import a_broken_file
from services.inference.preprocess import PreprocessSpec
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """Everything the server knows about the model: it never sees the network itself."""

    name: str
    class_names: list[str]
    preprocess: PreprocessSpec
    weights_sha256: str
    backend: Backend
    # How many batches the server may run at once (--inference-workers).
    workers: int


def load_served_model(settings: InferenceSettings) -> ServedModel:
    """Load weights, build the backend and return the model ready to run batches."""
    device = choose_device(
        settings.device,
        lambda: cuda_available(settings.backend),
        strict=settings.strict_device,
        why_not=lambda: cuda_missing_reason(settings.backend),
    )
    if settings.backend != "onnx":
        return _torch_model(settings, device)
    if settings.onnx_model is not None:  # the user's own file: its error is theirs to see
        return _onnx_model(settings.onnx_model, device, settings)
    export = _exported(settings)
    try:
        return _onnx_model(export, device, settings)
    except Exception as exc:
        if not a_broken_file(exc):  # out of GPU memory, a provider failing: not the file's
            raise
        # A cached export cut short (a disk fault, a crash before it reached the disk) failed
        # every start the same way, a crash loop under a supervisor: made again, once.
        log.warning("the cached export %s cannot be loaded (%s): exporting again", export, exc)
        export.unlink(missing_ok=True)
        return _onnx_model(_exported(settings), device, settings)


def _onnx_model(path: Path, device: str, settings: InferenceSettings) -> ServedModel:
    """The model of an ONNX file on `device`, or on the CPU where ONNX Runtime's CUDA provider
    is installed but cannot start (unless placement is strict)."""
    try:
        return _from_onnx_file(path, device, settings)
    except DeviceUnavailableError as exc:
        # strict refuses the CPU only for `--device cuda`, not for `auto` (which took CUDA
        # because the onnxruntime-gpu wheel lists its provider, whatever the node's GPU)
        if device != "cuda" or (settings.strict_device and settings.device == "cuda"):
            raise
        log.warning("device: %s; falling back to CPU", exc)
        return _from_onnx_file(path, "cpu", settings)


def _exported(settings: InferenceSettings) -> Path:
    """The registry model's ONNX export (made once per weights into the cache); found by the
    weights file's bytes without torch where it was made before (export_notes.py)."""
    from services.inference.export_notes import export_made_from, file_digest, note_export_made_from
    from services.inference.models import load_model, weights_file
    from services.inference.onnx_export import export_onnx

    source = weights_file(settings.model, settings.weights)
    digest = file_digest(source) if source is not None else None
    if digest is not None and (
        found := export_made_from(settings.model, digest, settings.cache_dir)
    ):
        log.info("using cached ONNX export %s, made from %s", found, source)
        return found
    export = export_onnx(load_model(settings.model, settings.weights), settings.cache_dir)
    # Noted only if the file still holds the bytes hashed: a file rewritten while it loaded
    # (a training job's checkpoint) must not name this export for its new bytes.
    if digest is not None and source is not None and file_digest(source) == digest:
        note_export_made_from(settings.model, digest, settings.cache_dir, export)
    return export


def _torch_model(settings: InferenceSettings, device: str) -> ServedModel:
    from services.inference.models import load_model, with_softmax

    loaded = load_model(settings.model, settings.weights)
    workers, threads, _ = _concurrency(settings, device)
    network, shape = with_softmax(loaded.network), loaded.preprocess.input_shape
    torchscript = settings.backend == "torchscript"
    failed_on_gpu = None
    try:
        backend = TorchBackend(
            network, shape, torchscript=torchscript, device=device, threads=threads
        )
        if device == "cuda":  # a batch of the largest size: out of memory shows here, not later
            backend.run(np.zeros((settings.max_batch_size, *shape), np.float32))
    # torch raises RuntimeError for a GPU it cannot use (no driver, out of memory) and
    # AssertionError where it was built without CUDA.
    except (RuntimeError, AssertionError) as exc:
        if device != "cuda":
            raise
        failed_on_gpu = (str(exc).splitlines() or [type(exc).__name__])[0]
        if settings.strict_device and settings.device == "cuda":
            raise DeviceUnavailableError(f"--device cuda: the GPU failed: {failed_on_gpu}") from exc
    if failed_on_gpu is not None:  # past the except: its traceback held the GPU's tensors
        log.warning("device: CUDA failed (%s); falling back to CPU", failed_on_gpu)
        backend = TorchBackend(
            network.cpu(), shape, torchscript=torchscript, device="cpu", threads=threads
        )
        _release_gpu_memory()
    return ServedModel(
        loaded.name, loaded.class_names, loaded.preprocess, loaded.weights_sha256, backend, workers
    )


def _concurrency(settings: InferenceSettings, device: str) -> tuple[int, int, int]:
    """Model calls at once, threads per call and threads of a lone call on `device`."""
    workers = settings.inference_workers or default_workers(settings.backend, device)
    threads = threads_per_call(workers, settings.inference_threads)
    # A lone call may use every core unless the threads per call were set by hand.
    lone_call_threads = 0 if settings.inference_threads else threads_per_call(1, 0)
    log.info("%d concurrent model call(s) with %d thread(s) each", workers, threads)
    return workers, threads, lone_call_threads


# The most model calls at once by default on a CPU (default_workers)
MAX_CPU_WORKERS = 16


def default_workers(backend: str, device: str) -> int:
    """Model calls that may run at once when --inference-workers is not set.

    ONNX Runtime on a CPU: one single-threaded call per core plus one, so that while every core
    runs the model one more request is decoded and answered; a lone call still gets every core
    (OnnxBackend). On 2 cores 3 workers did 1.00-1.04x the plain server's img/s at concurrency
    8 and 16 and 0.90x at 4, where 2 did 0.83-0.88x (docs/benchmarks.md). On a GPU two calls
    keep it busy while the CPU prepares the next; torch sets its threads for the whole process,
    so there one call at a time over all cores.

    Each worker is an ONNX Runtime session with its own copy of the weights and its own memory
    arena, so past MAX_CPU_WORKERS cores the calls share the cores instead: each takes the
    fewest threads that keep the sessions at MAX_CPU_WORKERS or fewer, and there are as many
    as keep the most cores busy (threads_per_call then gives each its share): a 64-core host
    with no CPU quota made 65 sessions, gigabytes and seconds of start-up; 16 on 24 cores left
    8 idle.
    """
    if backend != "onnx":
        return 1
    if device != "cpu":
        return 2
    cpus = usable_cpus()
    if cpus + 1 <= MAX_CPU_WORKERS:
        return cpus + 1
    # The count that keeps the most cores busy at the fewest threads a call needs (ties: more
    # sessions, each single-threaded where it can be): 16 x 1 on 17 cores, 15 x 2 on 31.
    most_threads = math.ceil(cpus / MAX_CPU_WORKERS)
    sessions = range(1, MAX_CPU_WORKERS + 1)
    return max(sessions, key=lambda count: (count * min(cpus // count, most_threads), count))


def _from_onnx_file(path: Path, device: str, settings: InferenceSettings) -> ServedModel:
    from services.inference.onnx_export import ExportedModelInfo

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    workers, threads, lone_call_threads = _concurrency(settings, device)
    try:
        backend = OnnxBackend(
            Path(path),
            device=device,
            threads=threads,
            sessions=workers,
            lone_call_threads=lone_call_threads,
        )
        info = ExportedModelInfo.from_metadata(backend.metadata)
        if device == "cuda":  # a batch of the largest size on every session (each has its own
            # memory arena): out of memory shows here, not at warm-up past the fallback
            shape = (settings.max_batch_size, *info.preprocess.input_shape)
            backend.warm_up([np.zeros(shape, np.float32)])
    except Exception as exc:
        if device != "cuda" or isinstance(exc, DeviceUnavailableError) or a_broken_file(exc):
            raise
        # A CUDA provider that loads, then fails (a driver older than its CUDA, no visible
        # device, out of memory) raises ONNX Runtime's own error, which it does not retry on
        # the CPU where TensorRT is listed too (as in the onnxruntime-gpu wheel).
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DeviceUnavailableError(f"ONNX Runtime's CUDA provider failed: {reason}") from exc
    log.info("serving %s from %s", info.name, path)
    return ServedModel(
        info.name, info.class_names, info.preprocess, info.weights_sha256, backend, workers
    )


def _release_gpu_memory() -> None:
    """Give back what the failed GPU start left in torch's caching allocator (the weights and
    the warm-up's activations): a server that fell back to the CPU held it for its whole life,
    short of memory the other jobs on a shared GPU (whose use caused the failure) need. No test
    of its own: these machines have no GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
