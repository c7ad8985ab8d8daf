"""Guest memory accesses performed by the hypervisor on the guest's behalf.

An emulator must never be a way around protection: every access it performs
goes through ``GuestAccess``, which applies the segment rules it is told to
apply, refuses anything at or above the hypervisor start (Xen's "DISALLOWING
UNSAFE ACCESS") or outside guest user space, and only then touches memory.
Writes into executable pages drop the translated code there.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlslab.machine import layout
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from tlslab.x86.descriptor import SegmentDescriptor
from tlslab.x86.segcheck import check_data_access


class AccessRefused(Exception):
    """The hypervisor will not perform this access; the guest gets SIGSEGV."""

    def __init__(self, reason: str, linear: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.linear = linear


@dataclass
class GuestAccess:
    """Performs emulated accesses for one trap.

    ``segments`` maps every segment register name to the descriptor the
    emulator treats it as having (for TLS selectors: what the guest asked for,
    not the truncated copy), or None for a null selector, which refuses any
    access (#GP). An emulator must use the base of the register an access
    really goes through -- %ss for the stack, %es for string destinations.
    """

    domain: "object"
    segments: dict[str, SegmentDescriptor]
    hypervisor_start: int
    accesses: int = 0

    def linear(self, segment: str, offset: int, size: int, write: bool) -> int:
        if segment not in self.segments:
            raise AccessRefused(f"no descriptor for %{segment}")
        desc = self.segments[segment]
        if desc is None:
            raise AccessRefused(f"%{segment} holds the null selector")
        check = check_data_access(desc, offset, size, write)
        if not check.allowed:
            raise AccessRefused(f"{segment}:{offset:#x}: {check.message}")
        base = desc.base
        linear = (base + offset) & 0xFFFFFFFF
        last = linear + size - 1
        if last > 0xFFFFFFFF or last >= self.hypervisor_start:
            raise AccessRefused(f"unsafe access to {linear:#010x} reaches the hypervisor hole", linear)
        if last >= layout.USER_TOP:
            raise AccessRefused(f"access to {linear:#010x} is outside guest user space", linear)
        mem = self.domain.vcpu.mem
        need = PROT_WRITE if write else PROT_READ
        addr = linear
        while addr <= last:
            r = mem.region_at(addr)
            if r is None or not (r.prot & need or (not write and r.prot & PROT_EXEC)):
                raise AccessRefused(f"page fault at {addr:#010x}", addr)
            addr = r.end
        return linear

    def read(self, segment: str, offset: int, size: int) -> int:
        linear = self.linear(segment, offset, size, False)
        self.accesses += 1
        return int.from_bytes(self.domain.vcpu.mem.read(linear, size), "little")

    def write(self, segment: str, offset: int, size: int, value: int) -> None:
        linear = self.linear(segment, offset, size, True)
        mem = self.domain.vcpu.mem
        mem.write(linear, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        self.accesses += 1
        r = mem.region_at(linear)
        if r is not None and r.prot & PROT_EXEC:
            self.domain.vcpu.invalidate_code(linear, size)


class EmulatedCPU:
    """The ``tlslab.x86.semantics.CPU`` protocol over a trapped vCPU."""

    def __init__(self, domain, access: GuestAccess):
        self._regs = domain.vcpu.regs
        self._access = access
        self.written: dict[str, int] = {}

    def read_reg(self, name: str) -> int:
        if name in self.written:
            return self.written[name]
        return self._regs.get(name)

    def write_reg(self, name: str, value: int) -> None:
        self.written[name] = value & 0xFFFFFFFF

    def read_mem(self, segment: str, offset: int, size: int) -> int:
        return self._access.read(segment, offset, size)

    def write_mem(self, segment: str, offset: int, size: int, value: int) -> None:
        self._access.write(segment, offset, size, value)

    def commit(self) -> None:
        for name, value in self.written.items():
            self._regs.set(name, value)
