"""The docs' references to tests point at tests that exist: docs/reliability.md names the test
of each fault it lists, and two of its ~220 names had gone stale (renamed or merged tests)."""

from __future__ import annotations

import re

from devstack.launcher import REPO_ROOT

# `test_file.py::test_name`, or `::test_name` for another test of the file named before it
CITATION = re.compile(r"`(test_\w+\.py)?::(test_\w+)")


def test_every_test_the_docs_name_exists() -> None:
    missing = []
    for doc in sorted((REPO_ROOT / "docs").glob("*.md")):
        for line_number, line in enumerate(doc.read_text().splitlines(), 1):
            file = None
            for named_file, name in CITATION.findall(line):
                file = named_file or file
                source = REPO_ROOT / "tests" / (file or "")
                if not file or not source.is_file():
                    missing.append(f"{doc.name}:{line_number}: {file}::{name} (no such file)")
                elif not re.search(rf"^(async )?def {name}\(", source.read_text(), re.M):
                    missing.append(f"{doc.name}:{line_number}: {file}::{name}")
    assert missing == []
