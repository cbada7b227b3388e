"""Where the worker's CPU goes while it launches a backlog (``python -m bench --profile``).

`py-spy <https://github.com/benfred/py-spy>`_ samples the worker process with
``--gil`` (only the thread holding the interpreter lock, so the samples are the
Python work that competes for it) from the release of the backlog until all its
pods run. Each sampled stack is put in one part of the worker's work, by the first
rule of :data:`PARTS` that matches its frames.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: ``(part, frames that must all be on the stack)``, first match wins. A part may have
#: several rules: py-spy loses the outer frames of a suspended generator now and then.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("watch: decoding events (JSON)", ("KubeApi.watch", "loads")),
    ("watch: decoding events (JSON)", ("Watcher._run", "JSONDecoder.decode")),
    ("watch: reading the HTTP stream", ("KubeApi.stream",)),
    ("watch: cache and work queue", ("Watcher._run",)),
    ("watch: cache and work queue", ("Watcher._watch",)),
    ("launch: API requests (HTTP, JSON)", ("Launcher.launch", "KubeApi.request")),
    ("launch: the manifest, the Job, the Secret, logs and metrics", ("Launcher.launch",)),
    ("clean-up: deleting Jobs", ("Reconciler._clean_up",)),
    ("reconcile: reading pods and Jobs from the cache", ("Reconciler.reconcile",)),
    ("work queue: taking keys", ("WorkQueue._work",)),
    ("Celery consumer: task events", ("asynloop", "EventDispatcher.flush")),
    ("Celery consumer: receiving messages", ("asynloop", "MultiChannelPoller.on_readable")),
    ("Celery consumer: acks and reports", ("asynloop", "LoopBridge.drain")),
    ("Celery consumer: the rest", ("asynloop",)),
)
OTHER = "other (start-up imports, timers, …)"


@dataclass
class Profile:
    """Samples by part of the work."""

    samples: dict[str, int]
    rate: int  # samples a second

    @property
    def total(self) -> int:
        return sum(self.samples.values())

    def ms_per_task(self, tasks: int) -> dict[str, float]:
        return {part: count / self.rate * 1000 / tasks for part, count in self.samples.items()}

    def describe(self, tasks: int) -> str:
        """``part ms (share)`` for each part sampled, the largest first."""
        per_task = self.ms_per_task(tasks)
        ordered = sorted(self.samples, key=self.samples.get, reverse=True)
        return "; ".join(f"{part} {per_task[part]:.2f} ({self.samples[part] / self.total:.0%})"
                         for part in ordered)


def function_names(stack: str) -> list[str]:
    """The functions of one collapsed py-spy stack, ``func (file:line);…`` outermost first (a
    leading process or thread name matches no rule)."""
    return [frame.split(" (", 1)[0] for frame in stack.split(";")]


def part_of(functions: list[str]) -> str:
    present = set(functions)
    return next((part for part, needed in PARTS if present.issuperset(needed)), OTHER)


def parse_collapsed(text: str, rate: int) -> Profile:
    """A py-spy ``--format raw`` file (one ``stack count`` a line) as a :class:`Profile`."""
    samples: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack:
            samples[part_of(function_names(stack))] += int(count)
    return Profile(dict(samples), rate)


class Sampler:
    """py-spy recording one process, from :meth:`start` to :meth:`stop`."""

    RATE = 100

    def __init__(self, pid: int, output: Path):
        beside = Path(sys.executable).parent / "py-spy"  # in the bench's virtualenv
        executable = str(beside) if beside.exists() else shutil.which("py-spy")
        if executable is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        self.output = output
        self.argv = [executable, "record", "--pid", str(pid), "--gil", "--rate", str(self.RATE),
                     "--format", "raw", "--output", str(output), "--nonblocking"]
        self.process: subprocess.Popen | None = None

    def start(self) -> Sampler:
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def stop(self) -> Profile:
        """Stop recording (py-spy writes its file on SIGINT) and read the profile."""
        self.process.send_signal(signal.SIGINT)
        _, errors = self.process.communicate(timeout=60)
        if not self.output.exists():
            raise RuntimeError(f"py-spy wrote no profile: {errors.decode(errors='replace').strip()}")
        return parse_collapsed(self.output.read_text(), self.RATE)
