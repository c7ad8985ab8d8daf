"""What Unicorn sees for each TLS slot: descriptor views shifted into the slot's window.

Unicorn does not enforce segment limits, so tlslab never shows it the guest's
descriptor: a TLS slot with a window gets a flat expand-up view whose base is
the real base shifted into the window (``layout.window_base``), so every access
through it lands where the fast path judges it against the *model*
descriptor. Each distinct model descriptor gets a generation number, the key
under which the fast path memoises verdicts.
"""

from __future__ import annotations

from tlslab.machine import layout
from tlslab.x86.descriptor import SegmentDescriptor

# A valid ring-3 data descriptor with P=0: loading it raises #NP. Used for a
# slot that has no window, so that it can never be used unchecked.
NOT_PRESENT_TLS = SegmentDescriptor(limit=0xFFFFF, rw=True, s=True, dpl=3, present=False, db=True,
                                    granularity=True).to_bytes()
EMPTY_SLOT = bytes(8)  # what Linux has in an unused TLS slot: loading it faults


class DescriptorViews:
    """Views (the 8 bytes Unicorn reads) and generation numbers of model descriptors."""

    def __init__(self, checks: bool):
        self.checks = checks
        self._views: dict[tuple[SegmentDescriptor, int], bytes] = {}
        self._generations: dict[SegmentDescriptor, int] = {}
        self._by_generation: list[SegmentDescriptor] = []

    def generation_of(self, desc: SegmentDescriptor) -> int:
        gen = self._generations.get(desc)
        if gen is None:
            gen = len(self._by_generation)
            self._generations[desc] = gen
            self._by_generation.append(desc)
        return gen

    def __len__(self) -> int:
        """How many descriptors have a generation number."""
        return len(self._by_generation)

    def descriptor(self, generation: int) -> SegmentDescriptor:
        return self._by_generation[generation]

    def view(self, index: int, desc: SegmentDescriptor | None) -> bytes:
        """The 8 bytes Unicorn reads for TLS slot ``index`` holding ``desc``."""
        if desc is None:
            return EMPTY_SLOT
        if not desc.present or not self.checks:
            return desc.to_bytes()  # not present: faults as it should; no checks: plain Unicorn
        if index not in layout.SLOT_WINDOW_SHIFT:
            return NOT_PRESENT_TLS
        view = self._views.get((desc, index))
        if view is None:
            # flat expand-up data in the slot's window; Unicorn ignores limits anyway,
            # the model descriptor is what the fast path checks
            view = self._views[(desc, index)] = SegmentDescriptor(
                base=layout.window_base(index, desc.base), limit=0xFFFFF, present=True, s=True, rw=True,
                accessed=True, db=True, granularity=True, dpl=3).to_bytes()
        return view
