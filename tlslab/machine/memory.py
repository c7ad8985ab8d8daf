"""Guest memory: host-owned pages mapped into Unicorn, plus their window aliases.

Every guest page lives in a host buffer we own (``mmap``) and is mapped into
Unicorn with ``mem_map_ptr``. That buys two things measured as (docs/measurements.md#unicorn)
essential (section 4): Python reads and writes guest memory by slicing the
buffer instead of paying for ``uc.mem_read``, and the same page can be mapped a
second time in a segment *window* (see ``layout``), as MMIO with no
permissions over the same buffer (``map_alias``, from the fast path), so that
every fs/gs access raises a protection event before it commits.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
from dataclasses import dataclass, field

from unicorn import UC_PROT_EXEC, UC_PROT_NONE, UC_PROT_READ, UC_PROT_WRITE

from tlslab.machine import layout

PAGE = layout.PAGE_SIZE

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4  # Linux PROT_* values


class GuestFault(Exception):
    """A host-side access to guest memory hit an unmapped page (-> EFAULT)."""

    def __init__(self, address: int, size: int):
        super().__init__(f"guest address {address:#010x} (+{size}) is not mapped")
        self.address = address
        self.size = size


def page_floor(x: int) -> int:
    return x & ~(PAGE - 1)


def page_ceil(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


def unicorn_perms(prot: int) -> int:
    perms = UC_PROT_NONE
    if prot & PROT_READ:
        perms |= UC_PROT_READ
    if prot & PROT_WRITE:
        perms |= UC_PROT_WRITE | UC_PROT_READ
    if prot & PROT_EXEC:
        perms |= UC_PROT_EXEC | UC_PROT_READ
    return perms


def alias_perms(prot: int) -> int:
    """The rights a window access to a region has: the guest's read/write rights, never exec.

    Unicorn maps every alias with no permissions at all; the fast path checks
    these rights itself and lets allowed accesses through (``_fastpath.c``).
    """
    return unicorn_perms(prot) & ~UC_PROT_EXEC


@dataclass
class Region:
    """One contiguous host buffer mapped at ``start`` in guest user space."""

    start: int
    size: int
    prot: int
    name: str
    buffer: mmap.mmap = field(repr=False)
    host_address: int = field(repr=False)

    @property
    def end(self) -> int:
        return self.start + self.size


class GuestMemory:
    """The guest's user address space ``[0, layout.USER_TOP)``.

    Regions never overlap; ``map`` with MAP_FIXED semantics replaces what was
    there. ``alias_offsets`` are the distances at which every region is mapped
    again with no permissions (one per checked segment window).
    """

    def __init__(self, uc, alias_offsets: tuple[int, ...] = (), on_change=None, map_alias=None):
        self.uc = uc
        self.alias_offsets = alias_offsets
        self.map_alias = map_alias  # (start, size, host address): maps one alias (the fast path's MMIO)
        self.on_change = on_change  # called after every change of the region list
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self.mapped_bytes = 0
        self._batch_depth = 0
        self._batch_dirty = False
        self.version = 0            # bumped by every change of the region list or of a region's rights

    # -- queries ---------------------------------------------------------
    def regions(self) -> list[Region]:
        return list(self._regions)

    def region_at(self, address: int) -> Region | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            r = self._regions[i]
            if r.start <= address < r.end:
                return r
        return None

    def is_mapped(self, address: int, size: int = 1) -> bool:
        end = address + size
        while address < end:
            r = self.region_at(address)
            if r is None:
                return False
            address = r.end
        return True

    def find_free(self, size: int, top: int = layout.MMAP_TOP, bottom: int = layout.MMAP_BOTTOM) -> int:
        """Highest free page-aligned range of ``size`` bytes below ``top`` (top-down, like Linux)."""
        size = page_ceil(size)
        candidate_end = top
        for r in reversed(self._regions):
            if r.start >= candidate_end:
                continue
            if r.end <= candidate_end - size:
                break
            candidate_end = min(candidate_end, r.start)
        start = candidate_end - size
        if start < bottom:
            raise MemoryError("guest address space exhausted")
        return start

    # -- mapping ---------------------------------------------------------
    def map(self, start: int, size: int, prot: int, name: str = "") -> Region:
        if start % PAGE or size <= 0:
            raise ValueError(f"bad mapping {start:#x}+{size:#x}")
        size = page_ceil(size)
        if start + size > layout.USER_TOP:
            raise MemoryError(f"mapping {start:#x}+{size:#x} leaves guest user space")
        self.unmap(start, size)
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        host = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        region = Region(start, size, prot, name, buf, host)
        self.uc.mem_map_ptr(start, size, unicorn_perms(prot), host)
        for off in self.alias_offsets:
            self.map_alias(start + off, size, host)  # every access asks the fast path
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._regions.insert(i, region)
        self.mapped_bytes += size
        self._changed()
        return region

    def _changed(self) -> None:
        self.version += 1
        if self._batch_depth:
            self._batch_dirty = True
        elif self.on_change is not None:
            self.on_change()

    @contextlib.contextmanager
    def batched(self):
        """Many mapping changes, one notification (fork copies a whole address space)."""
        self._batch_depth += 1
        try:
            yield self
        finally:
            self._batch_depth -= 1
            if not self._batch_depth and self._batch_dirty:
                self._batch_dirty = False
                self._changed()

    def alias_regions(self) -> list[tuple[int, int, int]]:
        """(start, size, rights of a window access) of every alias mapping, sorted by start."""
        return sorted((r.start + off, r.size, alias_perms(r.prot)) for off in self.alias_offsets for r in self._regions)

    def _unmap_unicorn(self, start: int, size: int) -> None:
        self.uc.mem_unmap(start, size)
        for off in self.alias_offsets:
            self.uc.mem_unmap(start + off, size)

    def unmap(self, start: int, size: int) -> None:
        """Unmap ``[start, start+size)``; regions cut in two keep their pieces."""
        end = start + page_ceil(size)
        for r in [r for r in self._regions if r.start < end and r.end > start]:
            self._remove(r)
            keep_lo = (r.start, max(r.start, min(start, r.end)))
            keep_hi = (min(max(end, r.start), r.end), r.end)
            self._unmap_unicorn(r.start, r.size)
            for lo, hi in (keep_lo, keep_hi):
                if hi > lo:
                    piece = self.map(lo, hi - lo, r.prot, r.name)
                    piece.buffer[:] = r.buffer[lo - r.start : hi - r.start]
            r.buffer.close()
        self._changed()

    def _remove(self, r: Region) -> None:
        i = self._regions.index(r)
        del self._regions[i]
        del self._starts[i]
        self.mapped_bytes -= r.size

    def protect(self, start: int, size: int, prot: int) -> None:
        end = start + page_ceil(size)
        if not self.is_mapped(start, end - start):
            raise GuestFault(start, size)
        # split at the boundaries so protections stay per region
        for r in [r for r in self._regions if r.start < end and r.end > start]:
            if r.start < start or r.end > end:
                saved = bytes(r.buffer)
                name, rprot, rs = r.name, r.prot, r.start
                self.unmap(rs, r.size)
                for lo, hi, p in ((rs, start, rprot), (max(rs, start), min(r.end, end), prot), (end, r.end, rprot)):
                    if hi > lo:
                        piece = self.map(lo, hi - lo, p, name)
                        piece.buffer[:] = saved[lo - rs : hi - rs]
            else:
                r.prot = prot
                self.uc.mem_protect(r.start, r.size, unicorn_perms(prot))
        self._changed()  # the fast path's copy of the rights (aliases stay mapped with none)

    # -- data ------------------------------------------------------------
    def read(self, address: int, size: int) -> bytes:
        r = self.region_at(address)
        if r is not None and address + size <= r.end:
            o = address - r.start
            return r.buffer[o : o + size]
        out = bytearray()
        while size > 0:
            r = self.region_at(address)
            if r is None:
                raise GuestFault(address, size)
            n = min(size, r.end - address)
            o = address - r.start
            out += r.buffer[o : o + n]
            address += n
            size -= n
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        size = len(data)
        r = self.region_at(address)
        if r is not None and address + size <= r.end:
            o = address - r.start
            r.buffer[o : o + size] = data
            return
        if not self.is_mapped(address, size):
            raise GuestFault(address, size)
        pos = 0
        while pos < size:
            r = self.region_at(address + pos)
            n = min(size - pos, r.end - (address + pos))
            o = address + pos - r.start
            r.buffer[o : o + n] = data[pos : pos + n]
            pos += n

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def write_u32(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def read_cstring(self, address: int, limit: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < limit:
            r = self.region_at(address)
            if r is None:
                raise GuestFault(address, 1)
            o = address - r.start
            chunk = r.buffer[o : min(r.size, o + limit - len(out))]
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
            address += len(chunk)
        raise GuestFault(address, 1)
