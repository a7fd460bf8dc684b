"""CPU seconds per kind of process while a benchmark runs.

Benchmarks on a 2-core machine need to say where the CPU went, not only how long a run took:
a sampler thread reads every process's utime+stime twice a second and keeps each process's
last value, so short-lived processes (ffmpeg, Ray workers) count up to their last sample.
Processes are grouped by a classifier over their command line.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

import psutil

from devstack.processes import processes_with_descendants

SET_ASIDE = "set_aside"
ZOMBIE_PREFIX = "[no command line] "  # what a process shows once it has exited (a zombie)


def _read_processes() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds so far) of every process that can be read."""
    found: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter(["cmdline", "name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is None:  # gone meanwhile
            continue
        command = " ".join(process.info["cmdline"] or [])
        shown = command or f"{ZOMBIE_PREFIX}{process.info['name']}"
        found[process.pid] = (shown, times.user + times.system)
    return found


def process_tree(root_needle: str) -> frozenset[int]:
    """Every process whose command line holds `root_needle`, and all their descendants."""
    tree = processes_with_descendants(lambda command: root_needle in command)
    return frozenset(process.pid for process in tree)


def machine_busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; idle and I/O wait aside,
    and guest time, which Linux counts within user time already)."""
    times = psutil.cpu_times()._asdict()
    return sum(times.get(kind, 0.0) for kind in BUSY_KINDS)


BUSY_KINDS = ("user", "nice", "system", "irq", "softirq", "steal")


class CpuAccount:
    """Samples /proc while open; `by_kind()` gives CPU seconds used during the window."""

    def __init__(
        self,
        classify: Callable[[str], str],
        interval_s: float = 0.5,
        set_aside: frozenset[int] = frozenset(),
    ) -> None:
        """`set_aside`: processes of something else left running meanwhile (a benchmark's idle
        Ray cluster while a tool runs without it), counted as kind `SET_ASIDE`."""
        self.classify, self.interval_s, self.set_aside = classify, interval_s, set_aside
        self.start: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-account")
        self.busy_start = self.busy_end = 0.0
        # The sampling's own CPU, within this process's: a caller that counts this process
        # (the consumer under test, in bench.naive_stream) takes it out.
        self.own_cpu_s = 0.0

    def __enter__(self) -> CpuAccount:
        self.start = {pid: cpu for pid, (_, cpu) in _read_processes().items()}
        self.busy_start = machine_busy_cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.busy_end = machine_busy_cpu_s()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        started = time.thread_time()
        self._read()
        self.own_cpu_s += time.thread_time() - started

    def _read(self) -> None:
        for pid, (cmdline, cpu_s) in _read_processes().items():
            known = self.last.get(pid)
            if known is not None and cmdline.startswith(ZOMBIE_PREFIX):
                # An exiting process has no command line left, only its short name: keep the
                # one seen before, or its CPU would change kind at the end.
                cmdline = known[0]
            self.last[pid] = (cmdline, cpu_s)

    def processes(self) -> dict[str, int]:
        """How many processes of each kind used CPU in the window."""
        counts: dict[str, int] = defaultdict(int)
        for pid, (cmdline, cpu_s) in self.last.items():
            if cpu_s - self.start.get(pid, 0.0) > 0:
                counts[self._kind(pid, cmdline)] += 1
        return dict(sorted(counts.items()))

    def by_kind(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for pid, (cmdline, cpu_s) in self.last.items():
            used = cpu_s - self.start.get(pid, 0.0)
            if used > 0:
                totals[self._kind(pid, cmdline)] += used
        return {kind: round(seconds, 2) for kind, seconds in sorted(totals.items())}

    def _kind(self, pid: int, cmdline: str) -> str:
        return SET_ASIDE if pid in self.set_aside else self.classify(cmdline)

    @property
    def machine_busy_s(self) -> float:
        return round(self.busy_end - self.busy_start, 2)
