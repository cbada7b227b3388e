"""Certificates and keys for the local control plane."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local")
SERVER_IPS = ("127.0.0.1", "10.0.0.1")


@dataclass
class ControlPlanePki:
    """Paths of the files the API server and controller manager are started with."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    service_account_key: Path
    service_account_public_key: Path
    kubelet_client_cert: Path
    kubelet_client_key: Path


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _certificate(subject: str, issuer_name: x509.Name, public_key, signing_key, *, ca: bool,
                 names=(), ips=(), organization: str | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject_name = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if organization:
        subject_name.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject_name))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names or ips:
        alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(signing_key, hashes.SHA256())


def generate(directory: Path) -> ControlPlanePki:
    """Write a CA, an API server serving certificate and a service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k8s-celery-local-ca")])
    ca_cert = _certificate("k8s-celery-local-ca", ca_name, ca_key.public_key(), ca_key, ca=True)
    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving_cert = _certificate("kube-apiserver", ca_name, serving_key.public_key(), ca_key,
                                ca=False, names=SERVER_NAMES, ips=SERVER_IPS)
    # Service-account tokens are signed with RS256 by default.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    # The API server's client certificate for the kubelets (pods/log, exec). A kubelet
    # maps the organisation to groups: system:masters may read logs and exec.
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _certificate("kube-apiserver-kubelet-client", ca_name, client_key.public_key(), ca_key,
                               ca=False, organization="system:masters", usage=ExtendedKeyUsageOID.CLIENT_AUTH)

    pki = ControlPlanePki(
        ca_cert=directory / "ca.crt", ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt", serving_key=directory / "apiserver.key",
        service_account_key=directory / "sa.key", service_account_public_key=directory / "sa.pub",
        kubelet_client_cert=directory / "kubelet-client.crt", kubelet_client_key=directory / "kubelet-client.key")
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.ca_key, ca_key)
    pki.serving_cert.write_bytes(serving_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.serving_key, serving_key)
    _write_key(pki.service_account_key, sa_key)
    pki.kubelet_client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.kubelet_client_key, client_key)
    pki.service_account_public_key.write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki


def load_ca(pki: ControlPlanePki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The cluster CA's certificate and key."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    return ca_cert, serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)


def issue_serving(pki: ControlPlanePki, name: str, ips: tuple[str, ...], directory: Path) -> tuple[Path, Path]:
    """A serving certificate signed by the cluster CA for ``name`` and ``ips`` (a
    kubelet's, say); returns the paths of the certificate and its key."""
    ca_cert, ca_key = load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, ca_cert.subject, key.public_key(), ca_key, ca=False, names=(name,), ips=ips,
                        usage=ExtendedKeyUsageOID.SERVER_AUTH)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path
