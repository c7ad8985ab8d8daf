"""What a vCPU run ends with, and how raw stops become explicit exits (KVM style).

``VCpu.run`` stops for one of a few reasons (``ExitReason``); this module names
them and turns what Unicorn and the C fast path report -- a refused window
access, an unmapped or protected address -- into an ``Exit`` the layers above
act on: a ``SegmentViolation`` carries everything a #GP handler needs, a
``PageFault`` where and how a page was touched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from unicorn import UC_ERR_FETCH_PROT, UC_ERR_FETCH_UNMAPPED

from tlslab.machine import fastpath, layout
from tlslab.x86.descriptor import SegmentDescriptor
from tlslab.x86.segcheck import check_data_access
from tlslab.x86.segusage import SEGMENT_NAMES, SegmentUsage


class ExitReason(enum.Enum):
    SYSCALL = "syscall"                      # int 0x80; EIP already past it
    SEGMENT_VIOLATION = "segment-violation"  # fs/gs access refused by its descriptor (#GP)
    PAGE_FAULT = "page-fault"                # access to an unmapped page or outside user space
    EXCEPTION = "exception"                  # other CPU exception (#UD, #GP from privileged insn, ...)
    TIMEOUT = "timeout"                      # wall-clock limit reached
    PREEMPTED = "preempted"                  # the instruction budget given to run() is used up


@dataclass(frozen=True)
class SegmentViolation:
    """A refused fs/gs access: everything a #GP handler needs to act on it."""

    eip: int
    segment: str            # "fs" or "gs"
    selector: int
    offset: int             # 32-bit effective address within the segment
    size: int
    write: bool
    linear: int             # (real base + offset) mod 2^32
    descriptor: SegmentDescriptor
    reason: str


@dataclass(frozen=True)
class PageFault:
    eip: int
    linear: int
    size: int
    write: bool
    fetch: bool = False
    via_segment: str | None = None  # "fs"/"gs" when the access used one


@dataclass(frozen=True)
class Exit:
    reason: ExitReason
    eip: int
    violation: SegmentViolation | None = None
    page_fault: PageFault | None = None
    vector: int | None = None
    message: str = ""
    null_segment: str | None = None   # #GP from an access through fs/gs holding the null selector


def null_selector_gp(vcpu, eip: int, seg: str) -> Exit:
    """An access through %fs/%gs holding the null selector: #GP on x86 (Unicorn, which uses base 0 for it,
    sees an access near address 0 or, for a negative offset, near 4 GiB)."""
    vcpu.counters.exceptions += 1
    return Exit(ExitReason.EXCEPTION, eip, vector=13, null_segment=seg,
                message=f"#GP: memory access through %{seg} holding the null selector")


def exit_from_fastpath(vcpu, e) -> Exit:
    """The C fast path refused an access (``e``: its exit record)."""
    seg_name = SEGMENT_NAMES.get(e.seg, "ds")
    if e.kind == fastpath.EXIT_SEGMENT_VIOLATION:
        selector = vcpu.regs.get(seg_name) & 0xFFFF
        desc = vcpu.descriptors[layout.selector_index(selector)]
        check = check_data_access(desc, e.offset, e.size, bool(e.write))
        v = SegmentViolation(e.eip, seg_name, selector, e.offset, e.size, bool(e.write), e.linear, desc,
                             check.message if not check.allowed else "refused")
        vcpu.counters.violations[seg_name] = vcpu.counters.violations.get(seg_name, 0) + 1
        return Exit(ExitReason.SEGMENT_VIOLATION, e.eip, violation=v)
    if e.kind in (fastpath.EXIT_PAGE_FAULT, fastpath.EXIT_KERNEL_ACCESS):
        if seg_name in ("fs", "gs") and vcpu.regs.get(seg_name) & 0xFFFF < 4:
            return null_selector_gp(vcpu, e.eip, seg_name)
        vcpu.counters.page_faults += 1
        pf = PageFault(e.eip, e.linear, e.size, bool(e.write), via_segment=seg_name)
        if e.linear >= layout.USER_TOP:
            where = "outside guest user space"
        elif vcpu.mem.is_mapped(e.linear, e.size):
            where = "page not writable" if e.write else "page not readable"
        else:
            where = "unmapped"
        return Exit(ExitReason.PAGE_FAULT, e.eip, page_fault=pf, message=f"access to {e.linear:#010x} ({where})")
    return Exit(ExitReason.EXCEPTION, e.eip, message="fast-path site table full")


def unicorn_base(vcpu, seg: str) -> int:
    """The base Unicorn uses for ``seg`` now (shifted into a window for TLS slots)."""
    selector = vcpu.regs.get(seg) & 0xFFFF
    index = layout.selector_index(selector)
    if selector & 4 or selector < 4 or index >= len(vcpu.descriptors) or vcpu.descriptors[index] is None:
        return 0
    if not vcpu.checks or index not in layout.SLOT_WINDOW_SHIFT:
        return vcpu.descriptors[index].base
    return layout.window_base(index, vcpu.descriptors[index].base)


def access_segment(vcpu, usage: SegmentUsage, address: int, write: bool) -> str:
    """The segment register an access at Unicorn ``address`` went through (as the C hook decides)."""
    if write:
        return usage.write
    if usage.second_read and (address - unicorn_base(vcpu, usage.read)) & 0xFFFFFFFF != vcpu.regs.get("esi"):
        return usage.second_read  # cmps: not the esi operand, so the es:[edi] one
    return usage.read


def exit_from_unmapped(vcpu, eip: int, error: int, unmapped: tuple[int, int, bool, bool] | None) -> Exit:
    """An access Unicorn could not make (``unmapped``: what its unmapped-memory hook saw, if it ran)."""
    vcpu.counters.page_faults += 1
    address, size, write, _ = unmapped or (eip, 1, False, True)
    fetch = error in (UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT)
    linear, seg = address, None
    if not fetch:
        usage = vcpu.segment_usage(eip)
        seg = access_segment(vcpu, usage, address, write)
        if usage.read_modify_write and seg == usage.write:
            write = True  # the write permission is checked at the read, as the CPU does
        selector = vcpu.regs.get(seg) & 0xFFFF
        index = layout.selector_index(selector)
        desc = vcpu.descriptors[index] if not selector & 4 and index < len(vcpu.descriptors) else None
        if seg in ("fs", "gs") and selector < 4:
            vcpu.counters.page_faults -= 1
            return null_selector_gp(vcpu, eip, seg)
        if desc is not None and vcpu.checks and index in layout.SLOT_WINDOW_SHIFT:
            # through a window: translate back to the guest's own address, and
            # let the segment check take precedence as it does on x86
            window_base = (desc.base + layout.SLOT_WINDOW_SHIFT[index]) & 0xFFFFFFFF
            offset = (address - window_base) & 0xFFFFFFFF
            linear = (desc.base + offset) & 0xFFFFFFFF
            check = check_data_access(desc, offset, size, write)
            if not check.allowed:
                vcpu.counters.page_faults -= 1
                vcpu.counters.violations[seg] = vcpu.counters.violations.get(seg, 0) + 1
                v = SegmentViolation(eip, seg, selector, offset, size, write, linear, desc, check.message)
                return Exit(ExitReason.SEGMENT_VIOLATION, eip, violation=v)
    pf = PageFault(eip, linear, size, write, fetch=fetch, via_segment=seg)
    kind = "instruction fetch from" if fetch else ("write to" if write else "read from")
    return Exit(ExitReason.PAGE_FAULT, eip, page_fault=pf, message=f"{kind} unmapped {linear:#010x}")
