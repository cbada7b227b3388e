"""Start one container process of the process kubelet in its own mount namespace.

``python -m k8s_celery.testing.container SPEC.json`` unshares the mount and UTS namespaces,
sets the pod's hostname, bind-mounts each volume at its ``mountPath`` (and the termination-message file at
``terminationMessagePath``) so that only this process sees them, then execs the
container's command. The mounts vanish with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), None,
                       ctypes.c_ulong(flags), None), f"mount {source} on {target}")


def _ensure_target(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()


def enter(spec: dict) -> None:
    """Set up the namespace and mounts described by ``spec``; does not exec."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
    if spec.get("hostname"):  # like a pod: its own hostname
        name = spec["hostname"].encode()
        _check(_libc.sethostname(name, len(name)), "sethostname")
    _mount(None, "/", MS_REC | MS_PRIVATE)  # keep our mounts out of the host's view
    for mount in spec.get("mounts", []):
        _ensure_target(mount["source"], mount["target"])
        _mount(mount["source"], mount["target"], MS_BIND | MS_REC)
        if mount.get("readOnly"):
            _mount(None, mount["target"], MS_BIND | MS_REMOUNT | MS_RDONLY)


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    try:
        enter(spec)
        os.chdir(spec.get("workingDir") or "/")
        os.execvpe(spec["command"][0], spec["command"], spec["env"])
    except OSError as exc:
        print(f"container start failed: {exc}", file=sys.stderr)
        return 128
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv))
