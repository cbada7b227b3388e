"""A real Kubernetes node on this machine: kubelet, containerd, runc, CNI and kube-proxy.

``LocalCluster(node="real")`` starts one (:class:`RealNode`); :mod:`.images` builds
the images its pods run. Needs root, cgroups and Debian's containerd, runc,
containernetworking-plugins, iptables, mmdebstrap, buildah and gcc
(``bash scripts/setup.sh`` installs them; :mod:`..requirements` checks them).
"""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so that building the images needs nothing but the standard library.
    if name in ("RealNode", "RealNodeError"):
        from . import node
        return getattr(node, name)
    raise AttributeError(name)


__all__ = ["RealNode", "RealNodeError"]
