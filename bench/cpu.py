"""Where the machine's CPU goes while Jobs are launched: the whole machine and each process of
the bench, sampled from ``/proc`` (row 4's CPU budget).

On this machine the control plane, the process kubelet, Redis and the client that creates the
Jobs share the same cores, so a client's launch rate is bounded by what the others leave it:
:class:`CpuRecorder` says how much each of them spends a Job at the rate measured, and
:func:`budget_per_job` what a client may spend a Job for a given rate.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .harness import cpu_seconds

#: The fields of ``/proc/stat``'s ``cpu`` line that count as busy: user, nice, system, irq,
#: softirq, steal (idle and iowait do not; guest time is already in user).
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
OTHER = "other processes"


def machine_busy_seconds(stat: Path = Path("/proc/stat")) -> float:
    """Busy CPU seconds of all CPUs since boot."""
    fields = stat.read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in BUSY_FIELDS) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    machine: float
    processes: dict[str, float]


@dataclass(frozen=True)
class CpuShare:
    """CPU between two moments: cores busy, and CPU milliseconds a Job by process."""

    cores_busy: float
    ms_per_job: dict[str, float]  # by process, with OTHER for the rest of the machine

    @property
    def total_ms_per_job(self) -> float:
        return sum(self.ms_per_job.values())

    def without(self, *names: str) -> float:
        """Milliseconds a Job of every process but ``names``."""
        return sum(ms for name, ms in self.ms_per_job.items() if name not in names)


class CpuRecorder:
    """Samples the machine's and some processes' CPU time every ``interval`` seconds in a thread.

    A process that has exited keeps its last sample; ``add`` a process when it starts.
    """

    def __init__(self, processes: dict[str, int], interval: float = 0.2):
        self.pids = dict(processes)
        self.interval = interval
        self.samples: list[Sample] = []
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-recorder", daemon=True)

    def __enter__(self) -> CpuRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def share(self, start: float, end: float, jobs_per_second: float) -> CpuShare:
        """CPU from the last sample at or before ``start`` to the first at or after ``end``,
        as cores busy and as milliseconds a Job at ``jobs_per_second`` (a process not yet
        sampled at the start counts as another process)."""
        times = [sample.at for sample in self.samples]
        first = self.samples[max(bisect.bisect_right(times, start) - 1, 0)]
        last = self.samples[min(bisect.bisect_left(times, end), len(times) - 1)]
        elapsed = last.at - first.at
        if elapsed <= 0:
            raise ValueError("no CPU samples span the interval")
        per_second = {name: (last.processes[name] - first.processes[name]) / elapsed
                      for name in last.processes if name in first.processes}
        busy = (last.machine - first.machine) / elapsed
        per_second[OTHER] = max(busy - sum(per_second.values()), 0.0)
        return CpuShare(busy, {name: used / jobs_per_second * 1000 for name, used in per_second.items()})

    def _run(self) -> None:
        while True:
            self.samples.append(self._sample())
            if self._stop.wait(self.interval):
                self.samples.append(self._sample())
                return

    def _sample(self) -> Sample:
        for name, pid in list(self.pids.items()):
            try:
                self._last[name] = cpu_seconds(Path(f"/proc/{pid}/stat"))
            except (FileNotFoundError, ProcessLookupError):
                pass  # exited: its last sample stands
        return Sample(time.time(), machine_busy_seconds(), dict(self._last))


def budget_per_job(cores: int, jobs_per_second: float, rest_ms_per_job: float) -> float:
    """The CPU milliseconds a Job a client may spend so that ``cores`` sustain ``jobs_per_second``
    while the rest of the machine spends ``rest_ms_per_job``."""
    return cores * 1000 / jobs_per_second - rest_ms_per_job
