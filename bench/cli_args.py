"""The help layout every benchmark shares (its flag types are `common/cli_types.py`'s)."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.inference.settings import InferenceSettings


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module's whole docstring as written, and each flag's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        shown = action.default not in (None, [], argparse.SUPPRESS) and action.default is not False
        if not shown or "default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help shows the benchmark's docstring (what it measures and how to read
    its figures) and every default."""
    return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)


def add_model_cache_flag(parser: argparse.ArgumentParser) -> None:
    """--cache-dir: where the served model's ONNX export is kept (the service's own default)."""
    default = InferenceSettings.model_fields["cache_dir"].default
    parser.add_argument("--cache-dir", type=Path, default=default, help="model exports")
