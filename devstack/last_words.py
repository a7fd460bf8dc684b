"""What a process that failed to start said of why, to quote in the failure itself.

Free of psutil (unlike devstack.processes): `vidflow broker` runs on the stream extra alone."""

from __future__ import annotations

from pathlib import Path


def last_words(output: str, limit: int = 300) -> str:
    """What a process that failed to start said of why: its last line naming an error, else its
    last three lines (a message wrapped to the terminal's width). Quoted in the failure itself:
    a log folder that a benchmark's or a test's temporary directory held was gone by the time
    its reader looked."""
    said = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not said:
        return "it wrote nothing"
    error = next((line for line in reversed(said) if "error" in line.lower()), None)
    return (error or " ".join(said[-3:]))[-limit:]


def last_words_in(log_path: Path) -> str:
    """`last_words` of the log at `log_path` (nothing there: "it wrote nothing"), and where the
    log is for the rest."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    return f"{last_words(text)} (see {log_path})"
