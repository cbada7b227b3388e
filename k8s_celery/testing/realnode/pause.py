"""The sandbox ("pause") image, built here: upstream's ``build/pause/linux/pause.c`` from
the pinned ``k8s.io/kubernetes`` module, compiled static, in a one-layer OCI archive
made like upstream's ``FROM scratch`` Dockerfile (``/pause``, user 65535, that entrypoint).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .. import binaries

#: The tag upstream's build/pause/Makefile gives the pause image of the pinned release.
PAUSE_TAG = "3.10.1"


def _blob(layout: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layout[f"blobs/sha256/{digest.removeprefix('sha256:')}"] = data
    return {"digest": digest, "size": len(data)}


def _tar(members: dict[str, tuple[bytes, int]]) -> bytes:
    """A reproducible tar: fixed times and owners."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def oci_archive(path: Path, name: str, files: dict[str, tuple[bytes, int]], config: dict) -> Path:
    """Write a one-layer OCI image archive whose index names the image ``name``."""
    layout: dict[str, bytes] = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode()}
    layer = _tar(files)
    layer_descriptor = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(layout, layer)}
    image_config = {"architecture": "amd64", "os": "linux", "config": config,
                    "rootfs": {"type": "layers", "diff_ids": [layer_descriptor["digest"]]}}
    config_descriptor = {"mediaType": "application/vnd.oci.image.config.v1+json",
                         **_blob(layout, json.dumps(image_config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_descriptor, "layers": [layer_descriptor]}
    manifest_descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           **_blob(layout, json.dumps(manifest, sort_keys=True).encode()),
                           "annotations": {"io.containerd.image.name": name,
                                           "org.opencontainers.image.ref.name": name.rpartition(":")[2]}}
    layout["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [manifest_descriptor]}).encode()
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(_tar({member: (data, 0o644) for member, data in layout.items()}))
    partial.rename(path)
    return path


def compile_pause(output: Path) -> Path:
    """``gcc -static`` of the pinned release's pause.c, with upstream's CFLAGS."""
    source = binaries.go_module_dir("k8s.io/kubernetes", binaries.KUBERNETES_VERSION) / "build/pause/linux/pause.c"
    gcc = shutil.which("gcc")
    if not gcc:
        raise RuntimeError("gcc is needed to build the pause image (apt-get install gcc libc6-dev)")
    subprocess.run([gcc, "-Os", "-Wall", "-Werror", "-static",
                    f"-DVERSION=v{PAUSE_TAG}-k8s-celery-{binaries.KUBERNETES_VERSION}",
                    "-o", str(output), str(source)], check=True, capture_output=True, text=True)
    return output


def build_pause_image(path: Path, name: str) -> Path:
    """Compile pause and write its image archive to ``path``."""
    with tempfile.TemporaryDirectory(prefix="k8s-celery-pause-") as work:
        program = compile_pause(Path(work) / "pause")
        return oci_archive(path, name, {"pause": (program.read_bytes(), 0o755)},
                           {"Entrypoint": ["/pause"], "User": "65535:65535"})
