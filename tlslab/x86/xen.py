"""Xen's 2004 (x86-32 paravirtual) segment policy, as pure functions on descriptors.

Xen lives at the top of every address space, from ``hypervisor_start`` to 4 GiB.
A guest may install its own descriptors, so Xen rewrites each one so that no
offset reaches that range (:func:`truncate`, after ``check_descriptor`` in
xen/arch/x86/x86_32/mm.c). NPTL's flat 4 GiB ``%gs`` segment thereby loses its
top, and glibc's negative TLS offsets (``%gs:-0x20``), which rely on 32-bit
wrap-around, raise #GP. The *flip* strategy (``fixup_seg`` in
xen/arch/x86/x86_32/seg_fixup.c) answers such a fault by turning the truncated
expand-up segment into an expand-down one that covers everything *below* the
base, and back again when a positive offset faults (:func:`flip`).

Safety invariant, checked by tests: no descriptor produced by :func:`truncate`
or :func:`flip` admits a linear address at or above ``hypervisor_start``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tlslab.x86.descriptor import LIMIT_MASK, PAGE_SIZE, U32_MASK, SegmentDescriptor
from tlslab.x86.segcheck import check_data_access, valid_offset_interval


@dataclass(frozen=True)
class HypervisorProfile:
    """A Xen build: where its private area starts (HYPERVISOR_VIRT_START)."""

    name: str
    hypervisor_start: int

    def __post_init__(self) -> None:
        if not 0 < self.hypervisor_start <= U32_MASK or self.hypervisor_start % PAGE_SIZE:
            raise ValueError(
                f"hypervisor_start {self.hypervisor_start:#x} must be a page-aligned 32-bit address"
            )


PROFILES: dict[str, HypervisorProfile] = {
    "nonpae": HypervisorProfile("nonpae", 0xFC00_0000),  # top 64 MiB
    "pae": HypervisorProfile("pae", 0xF580_0000),  # top 168 MiB
}
DEFAULT_PROFILE = "nonpae"


def get_profile(name: str | HypervisorProfile) -> HypervisorProfile:
    """Look a profile up by name (a profile passes through unchanged)."""
    if isinstance(name, HypervisorProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown hypervisor profile {name!r} (known: {known})") from None


# ------------------------------------------------------------------ geometry
def admitted_linear_ranges(desc: SegmentDescriptor) -> list[tuple[int, int]]:
    """Inclusive linear-address ranges some data access through ``desc`` can touch.

    At most two ranges: the valid offsets are one interval, but base + offset
    may wrap past 4 GiB. Empty if the segment is not present or not readable.
    """
    interval = valid_offset_interval(desc)
    if not desc.present or not desc.readable or interval is None:
        return []
    first = desc.base + interval[0]
    last = desc.base + interval[1]
    top = U32_MASK + 1
    if last < top:
        return [(first, last)]
    if first >= top:
        return [(first - top, last - top)]
    return [(first, U32_MASK), (0, last - top)]


def admits_linear(desc: SegmentDescriptor, linear: int) -> bool:
    """Can some (1-byte read) access through ``desc`` reach ``linear``?"""
    offset = (linear - desc.base) & U32_MASK
    return check_data_access(desc, offset, 1, write=False).allowed


def reaches_hypervisor(desc: SegmentDescriptor, profile: HypervisorProfile | str) -> bool:
    """True if any access through ``desc`` would land at or above hypervisor_start."""
    hv = get_profile(profile).hypervisor_start
    return any(last >= hv for _, last in admitted_linear_ranges(desc))


# ---------------------------------------------------------------- truncation
def _unusable(desc: SegmentDescriptor) -> SegmentDescriptor:
    """No limit can keep this segment out of Xen: Xen refused such a descriptor.

    Our model cannot fail the guest's hypercall, so it installs the descriptor
    marked not present: every access through it faults (NOT_PRESENT).
    """
    return replace(desc, present=False)


def truncate(desc: SegmentDescriptor, profile: HypervisorProfile | str) -> SegmentDescriptor:
    """The descriptor Xen actually installs when a guest asks for ``desc``.

    Only the limit field changes (or, if nothing can be saved, ``present``),
    and only as much as needed: the result admits every linear address the
    original admitted below ``hypervisor_start`` that the limit's granularity
    can express, and nothing at or above it. Not-present and system
    descriptors pass through. Code segments are truncated like expand-up data
    (as Xen did): a readable code segment is readable data.
    """
    hv = get_profile(profile).hypervisor_start
    if not desc.present or desc.is_system:
        return desc
    if desc.expand_down:
        return _truncate_expand_down(desc, hv)
    return _truncate_expand_up(desc, hv)


def _truncate_expand_up(desc: SegmentDescriptor, hv: int) -> SegmentDescriptor:
    # Offsets [0, limit] map to [base, base + limit]: cap the last byte at hv - 1.
    if desc.base >= hv:
        return _unusable(desc)
    max_limit = hv - 1 - desc.base
    if desc.effective_limit <= max_limit:
        return desc
    if not desc.granularity:
        return desc.with_limit(max_limit)  # < the old 20-bit limit, so it fits
    if max_limit < 0xFFF:  # base in the last page below Xen: not even one page fits
        return _unusable(desc)
    # largest F with (F << 12 | 0xFFF) <= max_limit; = ((hv - base) >> 12) - 1
    return desc.with_limit((max_limit - 0xFFF) >> 12)


def _truncate_expand_down(desc: SegmentDescriptor, hv: int) -> SegmentDescriptor:
    # Offsets (limit, upper] map upwards to base + upper. Raising the limit only
    # trims the *low* end, so the top byte must already be below Xen.
    if valid_offset_interval(desc) is None:
        return desc  # admits nothing
    upper = desc.upper_bound
    last_linear = (desc.base + upper) & U32_MASK
    if last_linear >= hv:
        return _unusable(desc)
    # Offsets >= first_safe map to [0, last_linear] without wrapping through Xen.
    first_safe = max(upper - last_linear, 0)
    if desc.effective_limit + 1 >= first_safe:
        return desc
    needed = first_safe - 1  # smallest acceptable effective limit
    if desc.granularity:
        return desc.with_limit(needed >> 12)  # smallest F with F << 12 | 0xFFF >= needed
    if needed > LIMIT_MASK:
        return _unusable(desc)
    return desc.with_limit(needed)


# ---------------------------------------------------------------- flipping
def truncated_flat_limit(base: int, profile: HypervisorProfile | str) -> int | None:
    """Limit field of a flat page-granular expand-up segment at ``base`` after truncation.

    ``((hypervisor_start - base) >> 12) - 1``, i.e. the last page ends at or
    below hypervisor_start; None when not even one page fits below Xen.
    """
    hv = get_profile(profile).hypervisor_start
    if base > hv - PAGE_SIZE:
        return None
    return ((hv - base) >> 12) - 1


def expand_down_flat_limit(base: int) -> int:
    """Limit field of the expand-down twin that fixup_seg installs: ``-(base & PAGE_MASK)`` in pages.

    Valid offsets are then ``[2**32 - (base & ~0xFFF), 0xFFFFFFFF]``, which wrap
    to linear ``[base & 0xFFF, base - 1]``: everything below the base (all
    negative offsets down to the bottom of memory). For base < 4 KiB the field
    is 0xFFFFF and no offset is valid.
    """
    return (((U32_MASK + 1) - (base & ~0xFFF)) >> 12) - 1


def looks_like_truncated_flat(desc: SegmentDescriptor, profile: HypervisorProfile | str) -> bool:
    """seg_fixup's test: is this a guest's flat 4 GiB segment, as truncated (or flipped)?

    Present 32-bit page-granular DPL-3 data segment whose limit is exactly the
    truncated one for its base (expand-up) or its expand-down twin.
    """
    if not (desc.present and desc.is_data and desc.db and desc.granularity and desc.dpl == 3):
        return False
    expand_up_limit = truncated_flat_limit(desc.base, profile)
    if expand_up_limit is None:
        return False
    if desc.expand_down:
        return desc.limit == expand_down_flat_limit(desc.base)
    return desc.limit == expand_up_limit


def flip(
    desc: SegmentDescriptor,
    offset: int,
    profile: HypervisorProfile | str,
    size: int | None = None,
) -> SegmentDescriptor | None:
    """fixup_seg: the descriptor to install after a #GP at ``offset``, or None.

    * expand-up, ``offset`` beyond the limit (a negative offset) -> expand-down
      covering everything below the base;
    * expand-down, ``offset`` at/below the limit (a positive offset) ->
      expand-up up to hypervisor_start.

    None means the fault is genuine: the descriptor is not a truncated flat
    segment, or flipping would not move ``offset`` inside. Only the E bit and
    the limit change. Xen tested ``offset > limit_in_bytes + 1``; we use the
    exact fault condition. If ``size`` is given, also return None unless the
    flipped segment admits the whole access; without that an offset pointing
    into Xen's own area would flip back and forth forever (as Xen 2004 did).
    """
    if not looks_like_truncated_flat(desc, profile):
        return None
    if desc.expand_down:
        if offset > desc.effective_limit:
            return None
        flipped = replace(desc, dc=False, limit=truncated_flat_limit(desc.base, profile))
    else:
        if offset <= desc.effective_limit:
            return None
        flipped = replace(desc, dc=True, limit=expand_down_flat_limit(desc.base))
    if size is not None and not check_data_access(flipped, offset, size, write=False).allowed:
        return None
    return flipped
