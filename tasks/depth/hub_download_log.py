"""How far the first download of a hub model has come, in the run's log every few seconds.

Depth Pro's weights are ~1.9 GB, which the depth actors fetch before the first map. They run
in Ray workers whose output does not reach the console or the Prefect UI (a private Ray runs
with `log_to_driver=False`, and actors are no task runs), and huggingface_hub draws its bars
with carriage returns that no log keeps: a first run sat at 0 % for minutes with no word of
why. The driver watches the model's folder in the Hugging Face cache instead, which the
actors of a run on this machine fill. Nothing is logged where nothing arrives there (a
cluster's nodes download into caches of their own).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.depth.model_files import WEIGHT_PATTERNS, cached_model_dir

log = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter  # a Prefect run logger is an adapter

LOG_EVERY_S = 10.0
POLL_S = 1.0
# A run whose actors download elsewhere (a cluster's nodes) shows nothing here: stop watching.
NOTHING_ARRIVES_S = 120.0
HUB_TIMEOUT_S = 10.0  # the model's size is only a figure for the log


def hub_cache_folder(model_name: str) -> Path:
    """The folder of hub model `model_name` in this machine's Hugging Face cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model_name, repo_type="model")


def bytes_arrived(folder: Path) -> int:
    """Bytes in the model's cached files, partial downloads (`*.incomplete`) included."""
    total = 0
    for path in (folder / "blobs").glob("*"):
        with contextlib.suppress(FileNotFoundError):  # renamed when its download ends
            total += path.stat().st_size
    return total


def model_size(model_name: str) -> int | None:
    """The bytes of the model's configs and weights, as the hub lists them; None if it does
    not say (the log then gives what has arrived, without the whole)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model_name, files_metadata=True, timeout=HUB_TIMEOUT_S)
        siblings = info.siblings or []
    except Exception:  # only a figure for the log: the download itself reports real errors
        return None
    patterns = ("*.json", *WEIGHT_PATTERNS)
    sizes = [s.size for s in siblings if any(Path(s.rfilename).match(p) for p in patterns)]
    return sum(sizes) if sizes and None not in sizes else None


@contextlib.contextmanager
def hub_download_logged(
    model_name: str, logger: Logger = log, every_s: float = LOG_EVERY_S
) -> Iterator[None]:
    """While the block runs, log every `every_s` how much of hub model `model_name` has reached
    this machine's cache, until the cache holds the whole model. Nothing for a local folder or
    a model already cached."""
    if Path(model_name).exists() or cached_model_dir(model_name) is not None:
        yield
        return
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(model_name, logger, every_s, stop), name="hub-download-log",
        daemon=True,
    )  # fmt: skip
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=2 * POLL_S)  # not for the hub's answer on the model's size


def _watch(
    model_name: str,
    logger: Logger,
    every_s: float,
    stop: threading.Event,
) -> None:
    folder = hub_cache_folder(model_name)
    started = time.monotonic()
    at_start = bytes_arrived(folder)  # what an interrupted earlier download left: resumed
    size: int | None = None
    arriving = False  # this run's download has begun
    logged_at, logged_bytes = started, at_start
    while True:
        ended = stop.wait(POLL_S)  # the run's end: one last look, for the line that says done
        now, present = time.monotonic(), bytes_arrived(folder)
        if cached_model_dir(model_name) is not None:
            if present > at_start:
                logger.info(
                    "depth model %s downloaded: %s in %.0f s", model_name, _mb(present),
                    now - started,
                )  # fmt: skip
            return
        if ended or (present == at_start and now - started > NOTHING_ARRIVES_S):
            return
        if present > at_start and not arriving:
            # Asked only now: a run whose actors download elsewhere never asks the hub here.
            arriving, size, logged_at = True, model_size(model_name), now
        if arriving and now - logged_at >= every_s:
            whole = f" of {_mb(size)}" if size else ""
            rate = (present - logged_bytes) / (now - logged_at)  # since the last line
            logged_at, logged_bytes = now, present
            logger.info(
                "downloading depth model %s from the Hugging Face hub: %s%s (%s/s)",
                model_name, _mb(present), whole, _mb(rate),
            )  # fmt: skip


def _mb(count: float) -> str:
    return f"{count / 1e6:,.1f} MB"
