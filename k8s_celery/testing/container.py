"""Start one container process of the process kubelet in its own mount namespace.

``python -m k8s_celery.testing.container SPEC.json`` unshares the mount and UTS namespaces,
sets the pod's hostname, bind-mounts each volume at its ``mountPath`` (and the termination-message file at
``terminationMessagePath``) so that only this process sees them, applies the
container's security context (read-only root filesystem, no new privileges, user and
groups), then execs the container's command. The mounts vanish with the process.
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
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]

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
    _apply_security(spec.get("security") or {})


def _apply_security(security: dict) -> None:
    if security.get("readOnlyRootFilesystem"):
        # Only the root mount turns read-only; the volumes bound above stay as they are.
        _mount(None, "/", MS_BIND | MS_REMOUNT | MS_RDONLY)
    if security.get("noNewPrivileges"):
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    uid, gid = security.get("uid", 0), security.get("gid", 0)
    if uid or gid or security.get("groups"):
        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
        os.setgroups(security.get("groups") or [])
        os.setgid(gid)
        os.setuid(uid)
        _keep_only_read_search()


def _keep_only_read_search() -> None:
    """Drop every capability but CAP_DAC_READ_SEARCH, kept across exec.

    The "image" is this machine's filesystem, whose permissions were not made for the
    container's user (the interpreter may live under a 0700 home): the user may read and
    traverse any file, as an image's files are readable by its user, and write none it
    does not own.
    """
    bit = 1 << CAP_DAC_READ_SEARCH
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(bit, bit, bit), _CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0),
           "prctl(PR_CAP_AMBIENT_RAISE)")


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
