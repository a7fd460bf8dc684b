"""Argparse flag types shared by the `vidflow` CLI and the benchmarks.

A flag's type raises `argparse.ArgumentTypeError`, so a bad value (0 rounds, a negative port, a
level list with a gap, a JSON path in a missing folder) is one line and exit 2 before any work
starts, instead of a traceback minutes into a run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from common.settings import MAX_WAIT_S


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    value = float(_number(text, float))
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return _finite(value, text)


def non_negative_float(text: str) -> float:
    value = float(_number(text, float))
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return _finite(value, text)


def _finite(value: float, text: str) -> float:
    """`value`, unless infinite or past a day (`MAX_WAIT_S`, the settings' cap): `--duration
    inf` never ended, and `--timeout inf` (or 1e10: gRPC reads a deadline that far as long
    past) gave up at once."""
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    if value > MAX_WAIT_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WAIT_S:g} (a day), not {text}")
    return value


def port(text: str) -> int:
    value = int(_number(text, int))
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, not {value}")
    return value


def port_or_zero(text: str) -> int:
    """A port, or 0 for any free one (for a server that says where it listens)."""
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a port from 0 (any free one) to 65535, not {value}"
        )
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated counts, each 1 or more: "1,2,4"."""
    parts = text.split(",")
    if not text.strip() or any(not part.strip() for part in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, not {text!r}")
    return [positive_int(part.strip()) for part in parts]


def choice_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A type for comma-separated names, each one of `choices`: "local,cluster"."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",")]
        unknown = [name for name in names if name not in choices]
        if not text.strip() or unknown:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated names from {', '.join(choices)}, not {text!r}"
            )
        return names

    return parse


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def vidflow_checkout(text: str) -> Path:
    """A folder holding a checkout of vidflow (the benchmarks serve older code from one)."""
    path = Path(text).expanduser()
    if not (path / "services" / "inference").is_dir():
        raise argparse.ArgumentTypeError(f"not a vidflow checkout: {path}")
    return path


def prepare_output_file(path: Path | None, flag: str) -> None:
    """Make the folder of a file written at a run's end now (`--summary-json`), so that no run
    is lost for it: ValueError naming `flag` where that cannot be done."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"{flag} {path}: its folder cannot be made: {exc.strerror or exc}"
        ) from None
    # Writable now (a file of another user, a read-only file system): found after the run, the
    # write failed and the run's summary was lost with it. Nothing is made here.
    there = path.exists()
    if not os.access(path if there else path.parent, os.W_OK):
        raise ValueError(
            f"{flag} {path}: {'the file' if there else 'its folder'} cannot be written here "
            "(its permissions, or a read-only file system)"
        )


def write_output_file(path: Path, text: str, flag: str) -> bool:
    """Write a file asked for at a run's end; False, with an error logged, where that fails
    (a disk that filled during the run): the caller still shows what it holds."""
    try:
        path.write_text(text)
    except OSError as exc:
        logging.getLogger("vidflow").error(
            "%s %s could not be written (%s): the summary is below", flag, path, exc
        )
        return False
    return True


def output_file(text: str) -> Path:
    """A file to write at the end: its folder must exist now, so no run is lost for it."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist")
    return path
