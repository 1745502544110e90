"""The embedded default environment: local etcd, OpenBao and sshd nodes (the test bed)."""

from cke.devenv.bed import BedConfig, TestBed

__all__ = ["BedConfig", "TestBed"]
