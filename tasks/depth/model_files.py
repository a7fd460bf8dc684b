"""Where a depth model's files come from: a local folder as it is, a Hugging Face hub id from the
local cache when the cache holds the whole model, and from the hub only when it does not.

Why not hand the hub id to transformers' `from_pretrained` every time: it asks the hub for each
file's latest revision first, and on a machine without network huggingface_hub retries every
request five times (~23 s a file, ~50 s to load a fully cached Depth Pro on an offline GPU box).
And why not `snapshot_download(local_files_only=True)` alone: it returns a snapshot folder that
holds only the config.json the driver's check fetched, so the first run of a hub id took that
for a whole model (the ONNX export failed on it and the run fell back to torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# What a transformers depth model needs besides its weights (`*.safetensors` or `*.bin`).
NEEDED_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class HubUnreachableError(ValueError):
    """The hub's host cannot be resolved and no proxy is configured: fail now, not after
    huggingface_hub's retries."""


def is_whole_model(folder: Path) -> bool:
    """Whether `folder` holds a model transformers can load: its configs and its weights (every
    shard its weight index lists, for a model saved in shards)."""
    if not all((folder / name).is_file() for name in NEEDED_FILES):
        return False
    # e.g. model.safetensors.index.json; a repo may hold a .bin index too (and a download of
    # every *.json brings both): one index with all its shards here is enough, but where there
    # is a safetensors index, transformers reads that one first and only that one counts.
    indexes = list(folder.glob("*.index.json"))
    first_read = [index for index in indexes if index.name == SAFETENSORS_INDEX]
    for index in first_read or indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if all((folder / shard).is_file() for shard in shards):
            return True
    # A model in one file beside a stray index; transformers reads a safetensors index before
    # `pytorch_model.bin`, so that one counts only where there is none.
    if (folder / "model.safetensors").is_file():
        return True
    if (folder / "pytorch_model.bin").is_file() and not (folder / SAFETENSORS_INDEX).is_file():
        return True
    return not indexes and any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def digest_model_files(digest: Any, model_dir: Path) -> None:
    """Add a model folder's configs and its weight files (name, size and time, not their
    gigabytes of content) to `digest` (hashlib's): what changes when the model is saved again."""
    for name in NEEDED_FILES:
        digest.update((model_dir / name).read_bytes())
    weight_files = [path for pattern in WEIGHT_PATTERNS for path in sorted(model_dir.glob(pattern))]
    for weights in weight_files:
        stat = weights.stat()
        digest.update(f"{weights.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())


def model_identity(depth_model: str) -> str:
    """Which files a local model folder holds now ("" for a hub id, whose cached snapshot
    changes name with its revision)."""
    folder, digest = Path(depth_model), hashlib.sha256()
    if not folder.is_dir():
        return ""
    try:
        digest_model_files(digest, folder)
    except OSError:  # not a whole model: loading it says why
        return ""
    return digest.hexdigest()[:12]


def unreadable_files(folder: Path) -> list[str]:
    """The files of a model folder this process may not read. A folder saved by another user
    with private files (safetensors writes its weights 0600) made every video fail at its depth
    stage with "No such file or directory" under a container's own user."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not os.access(p, os.R_OK))


def cached_model_dir(model_name: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot of hub id `model_name` if it holds the whole model, else None.

    Reads the cache only (no request): the snapshot that the cache's `main` ref names."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model_name, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # not cached at all, or not a valid hub id
        return None
    return folder if is_whole_model(folder) else None


def model_origin(model_name: str) -> str:
    """Where a run's model comes from, for its log: nothing for a folder; for a hub id, the
    cache, or the download that comes before the first map."""
    if Path(model_name).exists():
        return ""
    if cached_model_dir(model_name) is not None:
        return " (from this machine's Hugging Face cache)"
    return (
        " (from the Hugging Face hub: the first use downloads the weights, ~1.9 GB for Depth "
        "Pro, before the first map)"
    )


def check_hub_reachable(model_name: str) -> None:
    """Raise `HubUnreachableError` at once where the hub cannot be asked: huggingface_hub's
    offline mode (HF_HUB_OFFLINE), or a hub host name that does not resolve.

    Skipped behind a proxy (the proxy resolves names, not this machine)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # huggingface_hub's own error named neither it nor the cache
        setting = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
        raise HubUnreachableError(
            f"huggingface_hub is offline ({setting} is set) and its cache "
            f"({constants.HF_HUB_CACHE}) does not hold all of {model_name}: unset {setting} "
            f"where this machine may download, {_OTHER_WAYS.format(model=model_name)}"
        )
    endpoint = urlsplit(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if (endpoint.scheme or "https") in proxies or "all" in proxies:
        return  # a proxy for the hub's scheme (or ALL_PROXY, which httpx takes), not NO_PROXY
    host = endpoint.hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise HubUnreachableError(
            f"the Hugging Face hub at {constants.ENDPOINT} cannot be reached "
            f"({host}: {exc.strerror or exc}) and its cache ({constants.HF_HUB_CACHE}) does "
            f"not hold all of {model_name}: connect this machine, "
            f"{_OTHER_WAYS.format(model=model_name)}"
        ) from exc


_OTHER_WAYS = (
    "fill the cache elsewhere (`hf download {model}`, then copy HF_HOME here), or give a local "
    "folder; to try the pipeline with no weights at all, `python -m devstack.tiny_depth_pro "
    "DIR` saves an untrained stand-in to give as --depth-model DIR (its outputs are labelled "
    "untrained)"
)


def is_local_model(model_name: str) -> bool:
    """Whether `model_name` names a local folder rather than a hub id (`namespace/name`): one
    that exists, or one written as a path (absolute, relative, in a home folder, or with more
    than one `/`; hub names never start with `.`). The one rule for the driver's check, the
    workers' load and the settings, which disagreed (`.cache/depth` was a hub id to one)."""
    return (
        Path(model_name).is_dir()
        or model_name.startswith(("/", ".", "~"))
        or model_name.count("/") > 1
    )


def model_source(model_name: str) -> str:
    """What to hand `from_pretrained`: the folder itself, the cached snapshot when it is whole
    (no request to the hub), or the hub id when the hub is reachable."""
    if Path(model_name).is_dir():
        return model_name
    if is_local_model(model_name):  # a folder, not a hub id: not on this node
        raise FileNotFoundError(f"depth model folder {model_name} does not exist on this machine")
    cached = cached_model_dir(model_name)
    if cached is not None:
        return str(cached)
    check_hub_reachable(model_name)
    return model_name


def model_dir(model_name: str, patterns: list[str]) -> Path:
    """A local folder of the model: the folder itself, its whole cached snapshot, or the files
    matching `patterns` downloaded into the cache (what the cache lacks)."""
    source = model_source(model_name)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(model_name, allow_patterns=patterns))
    if not is_whole_model(folder):  # the hub failed and huggingface_hub fell back to the cache,
        # or the repo has no files of these patterns (weights only as *.bin, say)
        raise FileNotFoundError(
            f"{folder} holds only part of {model_name} ({', '.join(patterns)}): the hub did not "
            "send the rest, or the model has no such files; try again with the hub reachable, "
            "or give a local folder"
        )
    return folder
