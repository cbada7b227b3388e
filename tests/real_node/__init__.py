"""Tests on a real node: kubelet, containerd and runc running the images built here."""
