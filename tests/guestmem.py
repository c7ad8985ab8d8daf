"""Guest memory as host buffers, for tests of the decode-ahead walks (tests/test_ahead_differential.py,
tests/test_lookahead.py): what the Python walk reads (``region_at``, ``read``) and what the C walk reads
(``regions()`` with host addresses), over the same bytes."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass


@dataclass
class _Region:
    start: int
    size: int
    prot: int
    buffer: ctypes.Array

    @property
    def host_address(self) -> int:
        return ctypes.addressof(self.buffer)


class FakeMemory:
    """Guest memory as host buffers: what both walks read (``region_at``/``read`` for the Python one,
    ``regions()`` with host addresses for the C one)."""

    def __init__(self, regions):
        self._regions = [_Region(s, len(b), p, (ctypes.c_char * len(b)).from_buffer_copy(b)) for s, b, p in regions]
        self._regions.sort(key=lambda r: r.start)
        self.version = 0

    def regions(self):
        return list(self._regions)

    def region_at(self, address):
        for r in self._regions:
            if r.start <= address < r.start + r.size:
                return r
        return None

    def read(self, address, size):
        out = b""
        while len(out) < size:
            r = self.region_at(address + len(out))
            offset = address + len(out) - r.start
            out += bytes(r.buffer[offset:offset + size - len(out)])
        return out

    def protect(self, start: int, prot: int) -> None:
        """Change one region's rights (as mprotect would): the version moves on."""
        self.region_at(start).prot = prot
        self.version += 1

    def write(self, address: int, data: bytes) -> None:
        r = self.region_at(address)
        offset = address - r.start
        r.buffer[offset:offset + len(data)] = data
