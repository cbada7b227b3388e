"""The command lines and configuration of the node's Kubernetes components."""

from __future__ import annotations

import json
from pathlib import Path

from ..server import free_port


def kubelet_config(*, node_address: str, port: int, ca_cert: Path, runtime_endpoint: str, cgroup_root: str,
                   workdir: Path) -> dict:
    """A KubeletConfiguration for a test node on a developer machine or CI runner."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": node_address, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
        # The API server reaches logs and exec with a client certificate of the cluster CA;
        # bearer tokens are checked with the API server (TokenReview, SubjectAccessReview).
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(ca_cert)}},
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": runtime_endpoint,
        "cgroupDriver": "cgroupfs", "cgroupRoot": cgroup_root,
        "failSwapOn": False,
        # containerd 1.6 cannot pin the sandbox image: image GC stays off; the disk
        # thresholds are off too, as kind and minikube do, so that a full-ish disk on a
        # developer machine does not evict the tests' pods.
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "0%", "nodefs.inodesFree": "0%",
                         "imagefs.available": "0%", "imagefs.inodesFree": "0%"},
        "podLogsDir": str(workdir / "pod-logs"),
        "volumePluginDir": str(workdir / "volume-plugins"),
        "makeIPTablesUtilChains": False,
        "serializeImagePulls": False,
        "resolvConf": "/etc/resolv.conf",
    }


def kubelet_argv(bin_dir: Path, workdir: Path, config: dict, node_name: str, node_address: str) -> list[str]:
    """Writes the config file; every path the kubelet writes to is under ``workdir``."""
    config_path = workdir / "kubelet-config.json"
    config_path.write_text(json.dumps(config, indent=2))
    return [str(bin_dir / "kubelet"), f"--config={config_path}", f"--kubeconfig={workdir / 'kubelet.kubeconfig'}",
            f"--root-dir={workdir / 'kubelet'}", f"--cert-dir={workdir / 'kubelet-pki'}",
            f"--hostname-override={node_name}", f"--node-ip={node_address}", "--v=1"]


def proxy_argv(bin_dir: Path, workdir: Path, node_name: str, node_address: str) -> list[str]:
    return [str(bin_dir / "kube-proxy"), f"--kubeconfig={workdir / 'kube-proxy.kubeconfig'}",
            f"--hostname-override={node_name}", "--proxy-mode=iptables",
            f"--nodeport-addresses={node_address}/32", "--iptables-localhost-nodeports=false",
            # Leave the machine's conntrack settings as they are.
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            f"--metrics-bind-address=127.0.0.1:{free_port()}", f"--healthz-bind-address=127.0.0.1:{free_port()}"]


def scheduler_argv(bin_dir: Path, kubeconfig: Path) -> list[str]:
    return [str(bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--profiling=false"]
