"""A containerd (Debian's, with runc) of the node's own: config, root, state and socket
under the cluster's work directory, never the machine's ``/run/containerd``.

Its CRI plugin serves the kubelet: runc with the cgroupfs driver, no AppArmor, the CNI
config of :class:`~k8s_celery.testing.realnode.network.HostNetwork`, network
namespaces under its state directory and a sandbox ("pause") image that is built here
and imported under exactly the configured name.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..server import ManagedProcess

log = logging.getLogger(__name__)

NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
SHIM_SOCKET_DIR = "/run/containerd/s"
SOCKET_PATH_LIMIT = 104  # containerd's check (sockaddr_un's sun_path, portably)

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  # Where root lacks CAP_SYS_RESOURCE (this machine's bounding set drops it), runc cannot
  # set the negative oom_score_adj the kubelet asks for; clamp it to containerd's own.
  restrict_oom_score_adj = {restrict_oom_score_adj}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin_dir}"
    conf_dir = "{cni_conf_dir}"
    max_conf_num = 1
"""


CAP_SYS_RESOURCE = 24


def has_capability(number: int) -> bool:
    """Whether this process has the capability in its effective set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> number & 1)
    return False


class ContainerdError(RuntimeError):
    """containerd failed to start, or ``ctr`` failed."""


class Containerd:
    """One containerd process and the ``ctr`` client bound to it."""

    CONFIG_NAME = "config.toml"
    SOCKET_NAME = "containerd.sock"

    def __init__(self, workdir: Path, *, sandbox_image: str, cni_conf_dir: Path, cni_bin_dir: str):
        self.workdir = workdir
        self.sandbox_image = sandbox_image
        self.cni_conf_dir = cni_conf_dir
        self.cni_bin_dir = cni_bin_dir
        self.socket = workdir / self.SOCKET_NAME
        if len(f"{self.socket}.ttrpc") > SOCKET_PATH_LIMIT:
            raise ContainerdError(f"{self.socket}.ttrpc is longer than a unix socket path may be "
                                  f"({SOCKET_PATH_LIMIT} bytes): choose a shorter work directory")
        self.config_path = workdir / self.CONFIG_NAME
        self.process: ManagedProcess | None = None
        self.started_at: float | None = None
        self.executable = shutil.which("containerd") or "/usr/bin/containerd"
        self.ctr_executable = shutil.which("ctr") or "/usr/bin/ctr"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(CONFIG.format(
            root=self.workdir / "root", state=self.workdir / "state", socket=self.socket,
            opt=self.workdir / "opt", sandbox_image=self.sandbox_image, runc_root=self.workdir / "runc",
            cni_bin_dir=self.cni_bin_dir, cni_conf_dir=self.cni_conf_dir,
            restrict_oom_score_adj=str(not has_capability(CAP_SYS_RESOURCE)).lower()))
        return self.config_path

    def start(self, timeout: float = 30.0) -> None:
        if not os.access(self.executable, os.X_OK):
            raise ContainerdError("containerd is not installed (apt-get install containerd runc)")
        self.write_config()
        self.started_at = time.time()
        self.process = ManagedProcess("containerd", [self.executable, "--config", str(self.config_path)],
                                      self.workdir / "containerd.log")
        self.process.start()
        deadline = time.monotonic() + timeout
        while self.ctr("version", check=False).returncode:
            if not self.process.alive or time.monotonic() > deadline:
                raise ContainerdError(f"containerd did not start:\n{self.process.log_tail()}")
            time.sleep(0.1)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run([self.ctr_executable, "--address", str(self.socket), "--namespace", NAMESPACE,
                               *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise ContainerdError(f"ctr {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def images(self) -> set[str]:
        return set(self.ctr("images", "list", "--quiet").stdout.split())

    def import_image(self, archive: Path, name: str) -> None:
        """Import an OCI archive whose index names the image ``name``; check that it did."""
        self.ctr("images", "import", str(archive))
        if name not in self.images():
            raise ContainerdError(f"importing {archive} did not create image {name}: {sorted(self.images())}")

    # -- teardown ------------------------------------------------------------------------

    def remove_all(self) -> None:
        """Kill and delete every task and container of the CRI namespace."""
        tasks = [line.split()[0] for line in self.ctr("tasks", "list", check=False).stdout.splitlines()[1:]]
        for task in tasks:
            self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, check=False)
        for task in tasks:
            deadline = time.monotonic() + 10
            while self.ctr("tasks", "delete", task, check=False).returncode and time.monotonic() < deadline:
                time.sleep(0.1)
        for container in self.ctr("containers", "list", "--quiet", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)

    def shim_pids(self) -> list[int]:
        """containerd-shim processes serving this containerd (they outlive it by design)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in argv:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Stop containerd and any shim left (after :meth:`remove_all` none should be)."""
        if self.process:
            self.process.stop(timeout=10)
        for pid in self.shim_pids():
            log.warning("killing containerd-shim %d left running", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._remove_shim_sockets()

    def _remove_shim_sockets(self) -> None:
        # containerd 1.6 puts shim sockets in /run/containerd/s whatever its state dir is;
        # a shim removes its own on a clean exit, a killed one leaves it behind.
        directory = Path(SHIM_SOCKET_DIR)
        if not directory.is_dir() or self.started_at is None:
            return
        for entry in directory.iterdir():
            try:
                if entry.is_socket() and entry.stat().st_mtime >= self.started_at:
                    entry.unlink()
            except FileNotFoundError:
                pass
