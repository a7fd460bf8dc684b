"""`QuickExit`: a finished command exits with its code once every other exit handler has run,
without the interpreter's teardown (~0.9 s of one CPU for a depth driver)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, sys
from common.quick_exit import quick_exit

quick_exit.arm()
atexit.register(lambda: open(sys.argv[1] + ".atexit", "w").write("ran"))


class FreedAtTeardown:
    def __init__(self):
        self.path, self.open = sys.argv[1] + ".teardown", open  # sys is cleared by then

    def __del__(self):
        with self.open(self.path, "w") as marker:
            marker.write("ran")


kept = FreedAtTeardown()  # a module global: freed only when the interpreter tears down
print("last line, buffered")
if sys.argv[2] == "finish":
    quick_exit.finish(3)
sys.exit(3)
"""


def run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "command.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "marker"), mode],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_a_finished_command_skips_teardown_but_not_exit_handlers_or_output(tmp_path: Path):
    finished = run(tmp_path, "finish")
    assert finished.returncode == 3, finished.stderr
    assert finished.stdout == "last line, buffered\n"  # flushed before the exit
    assert (tmp_path / "marker.atexit").read_text() == "ran"  # registered later: ran first
    assert not (tmp_path / "marker.teardown").exists()


def test_an_unfinished_command_exits_the_usual_way(tmp_path: Path):
    usual = run(tmp_path, "no-finish")
    assert usual.returncode == 3, usual.stderr
    assert (tmp_path / "marker.atexit").read_text() == "ran"
    assert (tmp_path / "marker.teardown").read_text() == "ran"  # the teardown this test skips
