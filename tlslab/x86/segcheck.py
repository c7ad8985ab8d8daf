"""The data-access checks the CPU makes through a segment (Intel SDM vol. 3, 3.4.5.1, 5.3).

Unicorn does not enforce segment limits, so everything in tlslab that decides
"would this ``%gs`` access have raised #GP?" calls :func:`check_data_access`.
It is compared byte for byte against the real CPU by ``tests/test_oracle.py``.

An access of ``size`` bytes at offset ``o`` is valid iff every byte of it is
inside the segment, computed without 32-bit wrap-around:

* expand-up:   ``o + size - 1 <= limit``
* expand-down: ``o > limit`` and ``o + size - 1 <= upper bound``
  (0xFFFFFFFF if B=1, else 0xFFFF)

where ``limit`` is the effective (granularity-scaled) limit. Both reduce to
"``[o, o + size - 1]`` lies inside :func:`valid_offset_interval`".

One exception, found by the oracle (tests/test_oracle.py): a *flat* segment,
expand-up with base 0 and effective limit 0xFFFFFFFF, does not fault on an
access whose last byte wraps past 4 GiB (``movl %fs:0xfffffffe``); the same
access with any other base raises #GP. Intel calls accesses that wrap a
4 GiB segment implementation-specific (SDM vol. 3, "Segment Wraparound");
this is what the Intel Xeon we measured does, which matches the flat-segment
fast path of modern Intel cores. With a smaller expand-up limit a wrapping
access starts beyond the limit anyway; expand-down segments always fault on a
wrap (measured too). No Xen-truncated segment is flat, so the exception only
matters for native runs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tlslab.x86.descriptor import U32_MASK, SegmentDescriptor


class AccessFault(enum.Enum):
    """Why an access through a segment raises #GP (or #NP for NOT_PRESENT)."""

    NOT_PRESENT = "segment not present"
    NOT_DATA = "not a data segment (system segment, or execute-only code)"
    NOT_WRITABLE = "write to a read-only segment"
    BEYOND_LIMIT = "expand-up: last byte beyond the limit"
    AT_OR_BELOW_LIMIT = "expand-down: offset at or below the limit"
    ABOVE_UPPER_BOUND = "expand-down: last byte above the upper bound (or wraps)"


@dataclass(frozen=True)
class AccessCheck:
    """Verdict of one access: ``allowed``, else the precise ``reason`` and a message."""

    allowed: bool
    reason: AccessFault | None = None
    message: str = "allowed"

    def __bool__(self) -> bool:
        return self.allowed


ALLOWED = AccessCheck(True)


def valid_offset_interval(desc: SegmentDescriptor) -> tuple[int, int] | None:
    """Lowest and highest valid byte offset, or None if no offset is valid.

    Geometry only (limit, E, G, B); presence and permissions are checked by
    :func:`check_data_access`, as is the flat-segment wrap-around exception. Code
    segments are always expand-up.
    """
    limit = desc.effective_limit
    if not desc.expand_down:
        return (0, limit)
    if limit >= desc.upper_bound:
        return None
    return (limit + 1, desc.upper_bound)


def linear_address(desc: SegmentDescriptor, offset: int) -> int:
    """Base + offset modulo 2**32: the address the access uses once the check passed."""
    return (desc.base + offset) & U32_MASK


def check_data_access(
    desc: SegmentDescriptor, offset: int, size: int, write: bool
) -> AccessCheck:
    """Would a ``size``-byte read (or write) at ``offset`` through ``desc`` fault?

    Checks in the order the faults are distinguishable: presence, type
    (readable code counts as readable data, as the SDM allows), writability,
    then the limit. ``offset`` is the 32-bit effective address (already
    reduced modulo 2**32 by the address computation).
    """
    if not 0 <= offset <= U32_MASK:
        raise ValueError(f"offset {offset:#x} is not a 32-bit effective address")
    if size < 1:
        raise ValueError(f"access size must be positive, got {size}")

    if not desc.present:
        return _fault(AccessFault.NOT_PRESENT, "segment not present")
    if not desc.readable:
        what = "system segment" if desc.is_system else "execute-only code segment"
        return _fault(AccessFault.NOT_DATA, f"{what} cannot be used for data access")
    if write and not desc.writable:
        what = "code segment" if desc.is_code else "read-only data segment"
        return _fault(AccessFault.NOT_WRITABLE, f"write through a {what}")

    last = offset + size - 1  # deliberately not reduced mod 2**32: a wrap is a fault
    limit = desc.effective_limit
    if not desc.expand_down:
        if last > limit and not _flat(desc):
            wrap = " (wraps past 4 GiB)" if last > U32_MASK else ""
            return _fault(
                AccessFault.BEYOND_LIMIT,
                f"last byte {last:#x}{wrap} is beyond the limit {limit:#x}",
            )
        return ALLOWED
    if offset <= limit:
        return _fault(
            AccessFault.AT_OR_BELOW_LIMIT,
            f"offset {offset:#x} is at or below the expand-down limit {limit:#x}",
        )
    if last > desc.upper_bound:
        wrap = " (wraps past 4 GiB)" if last > U32_MASK else ""
        return _fault(
            AccessFault.ABOVE_UPPER_BOUND,
            f"last byte {last:#x}{wrap} is above the upper bound {desc.upper_bound:#x}",
        )
    return ALLOWED


def _flat(desc: SegmentDescriptor) -> bool:
    """Base 0, 4 GiB expand-up: the CPU skips the wrap-around check (see module doc)."""
    return desc.base == 0 and desc.effective_limit == U32_MASK


def _fault(reason: AccessFault, message: str) -> AccessCheck:
    return AccessCheck(False, reason, message)
