"""What a real node changes in the local control plane's PKI.

The API server then also listens on the node's address, so its serving certificate
must name it; it talks to the kubelet (logs, exec) with the cluster's kubelet client
certificate, which the kubelet trusts through the same CA.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

from .. import pki as control_plane_pki


def extend(pki: control_plane_pki.ControlPlanePki, node_address: str) -> None:
    """Re-issue the API server's serving certificate to also name ``node_address``."""
    ca_cert, ca_key = control_plane_pki.load_ca(pki)
    serving_key = serialization.load_pem_private_key(pki.serving_key.read_bytes(), password=None)
    serving = control_plane_pki._certificate(
        "kube-apiserver", ca_cert.subject, serving_key.public_key(), ca_key, ca=False,
        names=control_plane_pki.SERVER_NAMES, ips=(*control_plane_pki.SERVER_IPS, node_address))
    pki.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))
