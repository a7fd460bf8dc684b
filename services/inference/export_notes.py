"""Finding a cached ONNX export by the bytes of the weights file it was made from, without torch.

An export is cached under a hash of the weights as loaded (`onnx_export.cached_onnx_path`),
which takes torch and the network to compute: ~2.9 of a server's 6.5 s of start-up on 2 cores
(docs/benchmarks.md), for a file that was there all along. So the cache also keeps a note per
weights file, named by a hash of the file's bytes, the model, the installed torch's version
(its distribution's, which leaves out a local label such as +cu130 that `torch.__version__`
carries) and the export's format, saying which export was made from them. A file whose bytes
change misses, and is loaded and exported as before. Notes are a shortcut only: one that
cannot be read or written (a read-only cache) leaves the start to the slow way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

from common.files import atomic_output, remove_stale_partials
from services.inference.onnx_export import EXPORT_FORMAT_VERSION, OPSET

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str | None:
    """sha256 of the file's bytes; None where it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as weights:
            while chunk := weights.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _note_path(name: str, weights_digest: str, cache_dir: Path) -> Path | None:
    """Where the note for these weights bytes lives; None without torch installed (nothing
    is exported then)."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    key = hashlib.sha256(
        f"{name}|{weights_digest}|{torch_version}|{OPSET}|{EXPORT_FORMAT_VERSION}".encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / "by-weights-file" / f"{name}-{key}.json"


def export_made_from(name: str, weights_digest: str, cache_dir: Path) -> Path | None:
    """The cached export made before from weights with these bytes, if a note names one."""
    note = _note_path(name, weights_digest, cache_dir)
    if note is None:
        return None
    try:
        export = Path(cache_dir) / Path(json.loads(note.read_text())["export"]).name
        if not export.is_file():
            return None
        remove_stale_partials(export.parent, export.name)  # as export_onnx does on its way
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable or cut short: a miss
        return None
    return export


def note_export_made_from(name: str, weights_digest: str, cache_dir: Path, export: Path) -> None:
    """Note that `export` was made from weights with these bytes; a note that cannot be
    written only costs the next start the slow way."""
    note = _note_path(name, weights_digest, cache_dir)
    if note is None:
        return
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(note, durable=True) as partial:
            partial.write_text(json.dumps({"export": export.name}))
    except OSError as exc:
        log.warning("could not note which weights %s was made from (%s)", export.name, exc)
