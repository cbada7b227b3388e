"""Removing what a node leaves on the machine besides its processes' own state, and the
machine-wide lock that lets only one real node run at a time."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .hoststate import mount_points

#: The kubelet links every container log here, whatever its podLogsDir.
LEGACY_LOG_DIR = Path("/var/log/containers")
#: libcni's cache of ADD results (containerd 1.6 does not make it configurable).
CNI_RESULTS_DIR = Path("/var/lib/cni/results")


class MachineLock:
    """An exclusive, non-blocking ``flock`` on a file: held while a real node exists."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; False when another process keeps it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._file = handle
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    return False
                time.sleep(1)

    def release(self) -> None:
        if self._file:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def kill(pids) -> None:
    """SIGKILL each process (of the node's own cgroup or containerd) still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def unmount_under(directory: Path) -> list[str]:
    """Unmount everything mounted below ``directory``, deepest first; what stayed mounted."""
    prefix = str(directory) + "/"
    for _ in range(3):  # a mount may hide another one on the same point
        mounts = [mount for mount in mount_points() if mount.startswith(prefix)]
        if not mounts:
            return []
        for mount in reversed(mounts):
            if subprocess.run(["umount", mount], capture_output=True).returncode:
                subprocess.run(["umount", "--lazy", mount], capture_output=True)
    return [mount for mount in mount_points() if mount.startswith(prefix)]


def stale_node_dirs() -> list[Path]:
    """Work directories of real nodes whose kubelet left its root directory mounted."""
    found = []
    for mount in mount_points():
        path = Path(mount)
        if path.name == "kubelet" and (path.parent / "containerd" / "config.toml").exists():
            found.append(path.parent)
    return found


def remove_outside_links(workdir: Path, network_name: str) -> None:
    """The kubelet's log links into ``workdir`` and libcni's cached results of the network."""
    if LEGACY_LOG_DIR.is_dir():
        for link in LEGACY_LOG_DIR.iterdir():
            if link.is_symlink() and os.readlink(link).startswith(str(workdir)):
                link.unlink()
    if CNI_RESULTS_DIR.is_dir():
        for entry in CNI_RESULTS_DIR.glob(f"{network_name}-*"):
            entry.unlink()


def remove_created_dirs(before: dict[str, str]) -> None:
    """Remove the directories that were absent before the node started, with what is in them.

    Only the node's components write there while it runs (the lock keeps other nodes
    away): containerd's shim sockets, the kubelet's log links, libcni's cached results.
    """
    for path in sorted(before, key=len):
        if before[path] == "<absent>" and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
