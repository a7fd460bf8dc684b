"""Generates the Python gRPC stubs from protos/*.proto.

Run as ``python -m protos.generate`` (or ``make proto``) from the repository root. The stubs are
generated with the repository root as the include path, so they import each other as
``protos.inference_pb2`` and need no post-processing. ``tests/test_protos.py`` regenerates them
into a temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ["protos/inference.proto"]


def generate(out_dir: Path) -> list[Path]:
    """Write the ``_pb2``, ``_pb2_grpc`` and ``.pyi`` files for every proto under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(REPO_ROOT / name) for name in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILES}")
    return sorted((out_dir / "protos").glob("*_pb2*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root")
    generated = generate(parser.parse_args().out)
    for path in generated:
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
