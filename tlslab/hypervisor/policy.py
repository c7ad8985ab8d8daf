"""Descriptor policy: what the hypervisor does to a descriptor a guest installs.

Native hardware installs it as asked. Xen (x86-32, paravirtual) truncates every
guest segment so that nothing at or above the hypervisor start is reachable
(docs/background.md#problem); the truncation rule itself lives in ``tlslab.x86.xen``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlslab.x86 import xen
from tlslab.x86.descriptor import SegmentDescriptor


@dataclass(frozen=True)
class DescriptorPolicy:
    """``truncating=False`` is bare metal; otherwise Xen with ``profile``."""

    truncating: bool
    profile: xen.HypervisorProfile

    @classmethod
    def native(cls, profile: str = "nonpae") -> "DescriptorPolicy":
        return cls(False, xen.get_profile(profile))

    @classmethod
    def xen(cls, profile: str = "nonpae") -> "DescriptorPolicy":
        return cls(True, xen.get_profile(profile))

    @property
    def hypervisor_start(self) -> int:
        return self.profile.hypervisor_start

    def __call__(self, requested: SegmentDescriptor) -> SegmentDescriptor:
        return xen.truncate(requested, self.profile) if self.truncating else requested

    def describe(self) -> str:
        if not self.truncating:
            return "native (descriptors installed as requested)"
        return f"xen-{self.profile.name} (segments truncated below {self.hypervisor_start:#010x})"
