"""Volumes: a pod's volume directories on the node, written before its containers start."""

from __future__ import annotations

import os
from pathlib import Path

from .resolver import PodResolver
from .security import volume_owner


def prepare_volumes(pod: dict, pod_dir: Path, resolver: PodResolver) -> dict[str, Path]:
    """Write the pod's volumes under ``pod_dir/volumes`` and return each volume's
    directory by name (a ``hostPath`` volume is its own path).

    Files belong to the pod's ``runAsUser`` and ``fsGroup``; an ``emptyDir`` is
    writable by all, as the container may run as any user.
    """
    mounts: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        target = pod_dir / "volumes" / volume["name"]
        if "hostPath" in volume:
            mounts[volume["name"]] = Path(volume["hostPath"]["path"])
            continue
        target.mkdir(parents=True, exist_ok=True)
        files = resolver.volume_files(pod, volume)
        owner = volume_owner(pod["spec"])
        for relative, (data, mode) in files.items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
            os.chown(path, *owner)
        if "emptyDir" in volume:
            target.chmod(0o777)
        mounts[volume["name"]] = target
    return mounts
