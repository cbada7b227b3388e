"""The node's own cgroup subtree: the kubelet's ``cgroupRoot`` in every hierarchy.

The kubelet (cgroupfs driver) puts ``kubepods`` and every pod and container under
its ``cgroupRoot``, which must exist in each hierarchy before it starts. Giving the
node a subtree of its own keeps it apart from the rest of the machine and lets
:meth:`CgroupRoot.remove` delete everything it made.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from .hoststate import cgroup_mounts


class CgroupRoot:
    """``/<name>`` in every mounted cgroup hierarchy (v1 controllers, named and v2)."""

    def __init__(self, name: str):
        self.name = name

    @property
    def path(self) -> str:
        """The cgroup path as the kubelet's ``cgroupRoot`` wants it."""
        return f"/{self.name}"

    def directories(self) -> list[Path]:
        return [mount / self.name for mount in cgroup_mounts()]

    def create(self) -> None:
        for directory in self.directories():
            directory.mkdir(exist_ok=True)
            if (directory / "cpuset.cpus").exists():
                # cgroup v1 cpuset children start empty; a process cannot join one until
                # its cpus and mems are set.
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if not (directory / name).read_text().strip():
                        (directory / name).write_text((directory.parent / name).read_text())

    def processes(self) -> set[int]:
        """Every process in the subtree, in any hierarchy."""
        pids: set[int] = set()
        for directory in self.directories():
            for path, _, files in os.walk(directory):
                if "cgroup.procs" in files:
                    try:
                        pids.update(int(pid) for pid in Path(path, "cgroup.procs").read_text().split())
                    except OSError:
                        pass
        return pids

    def remove(self, timeout: float = 10.0) -> list[str]:
        """Remove the subtree, deepest first; returns the directories that stayed."""
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for directory in self.directories():
                if not directory.exists():
                    continue
                for path, _, _ in os.walk(directory, topdown=False):
                    try:
                        os.rmdir(path)
                    except OSError as exc:
                        if exc.errno != errno.ENOENT:
                            left.append(f"{path}: {exc.strerror}")
            if not left or time.monotonic() > deadline:
                return left
            # A cgroup stays busy for a moment after its last process exited.
            time.sleep(0.1)
