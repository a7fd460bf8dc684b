"""`--batching auto`'s verdict kept per model and machine, so that a restart does not time the
model again.

Timing batch 1 against the largest batch took ~2.3 of the 3.6 s a server needed to start on 2
cores (docs/benchmarks.md), on every start, restart and crash loop, for the answer the same
model gave last time on the same machine. So the verdict is kept in the cache folder under a
key of everything it depends on: the model and its weights, the backend, its runtime's version,
the device, the model workers and threads, the largest batch and the speed-up it must reach,
the usable CPUs and their model, and this module's version (MEMO_VERSION: raise it when the
backends or the measurement change). Anything else misses and is measured (and kept). A verdict
older than MAX_AGE, or one whose speed-up was within BORDERLINE of the line (where one noisy
measurement could have gone either way), is measured again. `--batching on` or `off`, or
deleting the file, measures nothing or anew. A file that cannot be read or written only costs
the time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common.cpus import usable_cpus
from common.devices import NVIDIA_GPUS
from common.files import atomic_output, exclusive_lock
from services.inference.batcher import BatchingChoice

log = logging.getLogger(__name__)

MEMO_FILE = "batching-choices.json"
MEMO_VERSION = 1
MAX_AGE = timedelta(days=7)
BORDERLINE = 0.05  # a speed-up within 5 % of --batching-min-speedup is measured at every start


def _cpu_model() -> str:
    """The CPU's model name (Linux), or '' where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _gpu_models() -> list[str]:
    """The models of this machine's NVIDIA GPUs (Linux), sorted; [] where none can be read.
    With CUDA_VISIBLE_DEVICES the key holds the variable too: it picks which one serves."""
    models = []
    try:
        for info in NVIDIA_GPUS.glob("*/information"):
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    models.append(line.split(":", 1)[1].strip())
    except OSError:
        pass
    return sorted(models)


def _runtime_version(backend: str) -> str:
    """The version of the library that runs the model (already imported by its backend)."""
    module = sys.modules.get("onnxruntime" if backend == "onnx" else "torch")
    return str(getattr(module, "__version__", ""))


def choice_key(**parts: Any) -> str:
    """A key of what `--batching auto`'s measurement depends on: the caller's `parts` (model,
    weights, backend, device, workers, threads, batch size, speed-up) and this machine's (its
    CPU, and on `cuda` its GPUs' models)."""
    machine: dict[str, Any] = {"cpus": usable_cpus(), "cpu": _cpu_model()}
    if parts.get("device") == "cuda":  # a verdict measured on one GPU model is not another's
        machine |= {"gpus": _gpu_models(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    runtime = {"runtime": _runtime_version(str(parts.get("backend", ""))), "memo": MEMO_VERSION}
    text = json.dumps({**parts, **machine, **runtime}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def recalled_choice(cache_dir: Path, key: str, min_speedup: float) -> BatchingChoice | None:
    """The verdict kept under `key`, its reason saying when it was measured; None if none,
    or if it is too old or was too close to `min_speedup` to keep."""
    try:
        kept = json.loads((Path(cache_dir) / MEMO_FILE).read_text())[key]
        choice = BatchingChoice(**kept["choice"])
        measured_at = datetime.fromisoformat(kept["measured_at"])
        speedup = choice.images_per_s_at_max / choice.images_per_s_at_1  # type: ignore[operator]
        age = datetime.now(UTC) - measured_at
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):  # none, or misshapen
        return None
    if not timedelta(0) <= age <= MAX_AGE or abs(speedup / min_speedup - 1) < BORDERLINE:
        return None
    reason = f"{choice.reason} (measured {kept['measured_at']}, kept in {MEMO_FILE})"
    return BatchingChoice(
        choice.max_batch_size, reason, choice.images_per_s_at_1, choice.images_per_s_at_max
    )


def remember_choice(cache_dir: Path, key: str, choice: BatchingChoice) -> None:
    """Keep `choice` under `key` beside the others; one that cannot be kept is only said.

    Read, changed and written under a lock: two servers starting on one cache each wrote back
    what they had read, and the last one's write dropped the other's verdict."""
    path = Path(cache_dir) / MEMO_FILE
    measured_at = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.with_name(f".{MEMO_FILE}.lock")):
            kept = _kept_choices(path)
            kept[key] = {"choice": asdict(choice), "measured_at": measured_at}
            with atomic_output(path) as partial:
                partial.write_text(json.dumps(kept, indent=1, sort_keys=True))
    except OSError as exc:
        log.warning("could not keep the batching verdict in %s (%s): the next start measures "
                    "again", path, exc)  # fmt: skip


def _kept_choices(path: Path) -> dict[str, Any]:
    """The memo file's verdicts; none where it is missing or misshapen."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}
