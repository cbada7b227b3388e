"""Container images for the real node, built here (no registry, nothing prebuilt pulled).

The chain, each step cached as an OCI archive under ``~/.cache/k8s-celery/images``
named by a hash of its inputs, so that a second run builds nothing:

1. ``pause``: :mod:`~k8s_celery.testing.realnode.pause` (the sandbox image).
2. ``python``: Debian packages (Python 3.11 and pip) made into a root filesystem by
   ``mmdebstrap`` from the mirror apt uses on this machine, imported into buildah.
3. ``python-deps``: that plus the package's ``install_requires`` from PyPI, i.e. what a
   Celery app's own image holds before k8s-celery is added.
4. ``k8s-celery``: the project's ``deploy/docker/Dockerfile`` built with ``buildah bud``
   with ``PYTHON_IMAGE=python`` and ``BASE_IMAGE=python-deps``.
5. ``taskapp`` and ``demo-app``: the tests' and the demo's Celery app on top of 4.

``python -m k8s_celery.testing.realnode.images`` builds them all and prints the archives.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import binaries
from ..requirements import MissingRequirement, require_executable, require_real_node
from . import pause

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
REGISTRY = "k8s-celery.local"
#: Bump to rebuild every image (a change of how images are built, not of their inputs).
RECIPE = "1"
#: Builds of each kind kept in the cache (other checkouts may be on other sources).
KEEP_PER_KIND = 3
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates", "tzdata")


class ImageBuildError(RuntimeError):
    """A build step failed (or, with ``build=False``, an image is not built)."""


@dataclass(frozen=True)
class Image:
    """A built image: its name (what pods use) and its OCI archive (what containerd imports)."""

    name: str
    archive: Path


def cache_dir() -> Path:
    return binaries.cache_root() / "images"


def digest(*parts: bytes | str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "big") + data)
    return hasher.hexdigest()[:16]


def tree_digest(root: Path, relative_paths: list[str]) -> str:
    """A hash of files and directories (names and contents), ignoring bytecode caches."""
    parts: list[bytes | str] = []
    for relative in sorted(relative_paths):
        path = root / relative
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
        for file in files:
            parts += [str(file.relative_to(root)), file.read_bytes()]
    return digest(*parts)


@contextlib.contextmanager
def building(image: Image):
    """Log how long building ``image`` took."""
    started = time.monotonic()
    log.info("building %s", image.name)
    yield
    log.info("built %s in %.0fs", image.name, time.monotonic() - started)


def _cached(kind: str, key: str, tag: str | None = None) -> Image:
    return Image(f"{REGISTRY}/{kind}:{tag or key}", cache_dir() / f"{kind}-{key}.oci.tar")


def pause_image(build: bool = True) -> Image:
    """The sandbox image (built on first use)."""
    source = binaries.go_module_dir("k8s.io/kubernetes", binaries.KUBERNETES_VERSION) / "build/pause/linux/pause.c"
    image = _cached("pause", digest(RECIPE, pause.PAUSE_TAG, source.read_bytes()), tag=pause.PAUSE_TAG)
    return built(image, lambda: pause.build_pause_image(image.archive, image.name), build)


def built(image: Image, build_it, build: bool = True) -> Image:
    """``image``, calling ``build_it()`` first when its archive is not in the cache (with
    ``build=False``, :class:`ImageBuildError` instead)."""
    if image.archive.exists():
        return image
    if not build:
        raise ImageBuildError(f"{image.name} is not built")
    require_real_node()
    cache_dir().mkdir(parents=True, exist_ok=True)
    # Another checkout's run may be building the same image: wait for it, then reuse.
    kind = image.archive.name.rsplit("-", 1)[0]
    with open(cache_dir() / f".{kind}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.archive.exists():
            with building(image):
                build_it()
    return image


class Buildah:
    """buildah with its storage in the cache directory (the images built on survive runs)."""

    def __init__(self, root: Path | None = None):
        self.root = root or binaries.cache_root() / "buildah"
        self.executable = require_executable("buildah", "buildah")

    def __call__(self, *args: str, check: bool = True) -> str:
        argv = [self.executable, "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", "overlay", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        if done.returncode and check:
            raise ImageBuildError(f"buildah {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def has(self, name: str) -> bool:
        return bool(self("images", "--quiet", "--filter", f"reference={name}").strip())

    def ensure(self, image: Image) -> None:
        """Have ``image`` in buildah's storage (after a wiped storage, from its archive)."""
        if not self.has(image.name):
            image_id = self("pull", "--quiet", f"oci-archive:{image.archive}").split()[-1]
            if not self.has(image.name):
                self("tag", image_id, image.name)

    def export(self, image: Image) -> Image:
        partial = image.archive.with_name(f"{image.archive.name}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        self("push", "--quiet", image.name, f"oci-archive:{partial}:{image.name}")
        partial.rename(image.archive)
        self.prune(image)
        return image

    def prune(self, image: Image, keep: int = KEEP_PER_KIND) -> None:
        """Forget all but the newest ``keep`` builds of the image's kind (archives and storage)."""
        kind = image.archive.name.rsplit("-", 1)[0]
        archives = sorted((p for p in cache_dir().glob(f"{kind}-*.oci.tar") if p.name.rsplit("-", 1)[0] == kind),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        for old in archives[keep:]:
            old.unlink(missing_ok=True)
            name = f"{REGISTRY}/{kind}:{old.name.removeprefix(kind + '-').removesuffix('.oci.tar')}"
            if self.has(name):
                self("rmi", "--force", name, check=False)
        # Best effort: a build running from another checkout may hold some layers.
        self("rmi", "--prune", check=False)

    def bud(self, image: Image, context: Path, containerfile: Path, build_args: dict[str, str]) -> Image:
        args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        if Path(HOST_CA_BUNDLE).is_file():
            # RUN steps reach PyPI through this machine's network: give them its trust
            # store (Debian's pip reads it) without baking it into the image.
            args.append(f"--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro")
        # chroot isolation and the host's network: no CNI or cgroups needed to build; a
        # failed step leaves no working container behind.
        self("bud", "--quiet", "--isolation=chroot", "--network=host", "--pull-never", "--no-cache", "--force-rm",
             *args, "-f", str(containerfile), "-t", image.name, str(context))
        return self.export(image)


def apt_sources() -> Path:
    """The deb822 sources file apt uses on this machine (its mirror feeds mmdebstrap)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        text = path.read_text()
        if "debian" in text and "Enabled: no" not in text:
            return path
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists() and re.search(r"^deb\s", legacy.read_text(), re.MULTILINE):
        return legacy
    raise ImageBuildError("no Debian apt sources found in /etc/apt")


def os_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise ImageBuildError("VERSION_CODENAME missing from /etc/os-release")


def install_requires() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]


def dockerfile_context_paths(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The repository paths the Dockerfile's ``COPY`` lines (without ``--from``) take."""
    paths = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not words[1].startswith("--from"):
            paths += words[1:-1]
    return paths


class ImageBuilder:
    """Builds (or finds in the cache) every image the real-node tests and demo use;
    ``build=False`` only finds them (:class:`ImageBuildError` for one not built)."""

    def __init__(self, repository: Path = ROOT, build: bool = True):
        self.repository = repository
        self.build = build
        cache_dir().mkdir(parents=True, exist_ok=True)
        self._buildah: Buildah | None = None
        self._k8s_celery: Image | None = None

    @property
    def buildah(self) -> Buildah:
        if self._buildah is None:
            self._buildah = Buildah()
        return self._buildah

    def python(self) -> Image:
        """Debian's Python 3.11 and pip, from this machine's apt mirror."""
        sources = apt_sources()
        suite = os_codename()
        image = _cached("python", digest(RECIPE, suite, sources.read_text(), *BASE_PACKAGES))
        return built(image, lambda: self._debootstrap(image, suite, sources), self.build)

    def python_deps(self) -> Image:
        """``python`` plus k8s-celery's dependencies: an app image before k8s-celery is added."""
        python = self.python()
        requirements = install_requires()
        image = _cached("python-deps", digest(RECIPE, python.name, *requirements))

        def build() -> Image:
            self.buildah.ensure(python)
            with tempfile.TemporaryDirectory(prefix="k8s-celery-deps-") as work:
                containerfile = Path(work) / "Containerfile"
                quoted = " ".join(f"'{requirement}'" for requirement in requirements)
                containerfile.write_text(f"FROM {python.name}\n"
                                         f"RUN python -m pip install --no-cache-dir {quoted}\n")
                return self.buildah.bud(image, Path(work), containerfile, {})
        return built(image, build, self.build)

    def k8s_celery(self) -> Image:
        """The project's own Dockerfile, built on the Debian-made Python images."""
        if self._k8s_celery is None:
            python, deps = self.python(), self.python_deps()
            paths = dockerfile_context_paths()
            # Hash the copy that is built, not the checkout, which may change meanwhile.
            with tempfile.TemporaryDirectory(prefix="k8s-celery-context-") as work:
                context = Path(work)
                for relative in paths:
                    source, target = self.repository / relative, context / relative
                    if source.is_dir():
                        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(source, target)
                image = _cached("k8s-celery", digest(RECIPE, python.name, deps.name, DOCKERFILE.read_bytes(),
                                                     tree_digest(context, paths)))

                def build() -> Image:
                    self.buildah.ensure(python)
                    self.buildah.ensure(deps)
                    return self.buildah.bud(image, context, DOCKERFILE,
                                            {"PYTHON_IMAGE": python.name, "BASE_IMAGE": deps.name})
                self._k8s_celery = built(image, build, self.build)
        return self._k8s_celery

    def app(self, kind: str, directory: Path, files: list[str]) -> Image:
        """The k8s-celery image plus a Celery app's modules in ``/app`` (on ``PYTHONPATH``)."""
        base = self.k8s_celery()
        with tempfile.TemporaryDirectory(prefix=f"k8s-celery-{kind}-") as work:
            context = Path(work)
            for name in files:
                shutil.copy(directory / name, context / name)
            image = _cached(kind, digest(RECIPE, base.name, tree_digest(context, files)))

            def build() -> Image:
                self.buildah.ensure(base)
                copies = "".join(f"COPY {name} /app/{name}\n" for name in files)
                (context / "Containerfile").write_text(
                    f"FROM {base.name}\n{copies}ENV PYTHONPATH=/app\nWORKDIR /app\n")
                return self.buildah.bud(image, context, context / "Containerfile", {})
            return built(image, build, self.build)

    def taskapp(self) -> Image:
        """The tests' Celery app (``tests/apps/taskapp.py``)."""
        return self.app("taskapp", self.repository / "tests" / "apps", ["taskapp.py"])

    def demo_app(self) -> Image:
        """The demo's Celery app (``examples/app/demo_app.py``)."""
        return self.app("demo-app", self.repository / "examples" / "app", ["demo_app.py"])

    def all(self) -> dict[str, Image]:
        return {"pause": pause_image(self.build), "python": self.python(), "python-deps": self.python_deps(),
                "k8s-celery": self.k8s_celery(), "taskapp": self.taskapp(), "demo-app": self.demo_app()}

    def _debootstrap(self, image: Image, suite: str, sources: Path) -> Image:
        mmdebstrap = require_executable("mmdebstrap", "mmdebstrap")
        with tempfile.TemporaryDirectory(prefix="k8s-celery-rootfs-") as work:
            rootfs = Path(work) / "rootfs.tar"
            done = subprocess.run([
                mmdebstrap, "--variant=essential", f"--include={','.join(BASE_PACKAGES)}",
                "--dpkgopt=path-exclude=/usr/share/{doc,man,info,locale}/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                # Like python:3.11-slim, pip installs into the system Python.
                "--customize-hook=rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED",
                "--customize-hook=rm -rf \"$1\"/var/cache/apt \"$1\"/var/lib/apt/lists",
                suite, str(rootfs), str(sources)], capture_output=True, text=True, timeout=1800)
            if done.returncode:
                raise ImageBuildError(f"mmdebstrap failed:\n{done.stderr[-4000:]}")
            container = self.buildah("from", "scratch").strip()
            try:
                self.buildah("add", container, str(rootfs), "/")
                self.buildah("config", "--env", "LANG=C.UTF-8", "--env", "PYTHONDONTWRITEBYTECODE=1",
                             "--cmd", "python3", container)
                self.buildah("commit", "--quiet", "--format=oci", container, image.name)
            finally:
                self.buildah("rm", container)
        return self.buildah.export(image)


def main(argv: list[str]) -> int:
    """``[--check]``: build (or only look for) every image; print their archives."""
    logging.basicConfig(level=logging.INFO)
    started = time.monotonic()
    try:
        built = ImageBuilder(build="--check" not in argv).all()
    except (ImageBuildError, MissingRequirement) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, image in built.items():
        size = os.path.getsize(image.archive) / 2**20
        print(f"{kind:12} {image.name:60} {size:7.1f} MiB  {image.archive}")
    print(f"done in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
