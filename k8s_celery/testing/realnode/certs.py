"""Certificates a real node adds to the local control plane's PKI.

The API server then also listens on the node's address (its serving certificate must
name it) and talks to the kubelet (logs, exec) with a client certificate that the
kubelet trusts through the same CA.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import pki as control_plane_pki


@dataclass
class NodeCertificates:
    """The API server's kubelet client certificate and key."""

    kubelet_client_cert: Path
    kubelet_client_key: Path


def _ca(pki: control_plane_pki.ControlPlanePki):
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    return ca_cert, ca_key


def extend(pki: control_plane_pki.ControlPlanePki, node_address: str) -> NodeCertificates:
    """Re-issue the serving certificate to also name ``node_address``; add the kubelet client pair."""
    ca_cert, ca_key = _ca(pki)
    serving_key = serialization.load_pem_private_key(pki.serving_key.read_bytes(), password=None)
    serving = control_plane_pki._certificate(
        "kube-apiserver", ca_cert.subject, serving_key.public_key(), ca_key, ca=False,
        names=control_plane_pki.SERVER_NAMES, ips=(*control_plane_pki.SERVER_IPS, node_address))
    pki.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))

    client_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    # The kubelet maps the certificate's organisation to groups: system:masters may read
    # logs and exec (the kubelet's webhook authorizer asks the API server).
    client = (x509.CertificateBuilder()
              .subject_name(x509.Name([
                  x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                  x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client")]))
              .issuer_name(ca_cert.subject).public_key(client_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=365))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    certs = NodeCertificates(pki.ca_cert.parent / "kubelet-client.crt", pki.ca_cert.parent / "kubelet-client.key")
    certs.kubelet_client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    control_plane_pki._write_key(certs.kubelet_client_key, client_key)
    return certs
