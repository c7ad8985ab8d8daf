"""Which file backs which guest address: the process's mapped objects, for naming code.

A dynamic program's code lives in several files: the executable (mapped by the
ELF loader), ld.so (mapped by the loader as the interpreter) and every library
ld.so maps with mmap2. A fault site is only meaningful with its object and
symbol, ``libc.so.6:free+0x4a``, so every file mapping is recorded here (and
forgotten again where munmap or a MAP_FIXED mapping replaces it, as ld.so does
with its reservation). Symbols are read from the mapped file itself (.symtab,
else .dynsym: Debian strips its libraries), parsed once per file content.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from tlslab.linux.elf import EXECUTABLE, ElfError, ElfImage, parse_elf_bytes


@dataclass(frozen=True)
class FileMapping:
    start: int
    end: int
    offset: int     # file offset of ``start``
    path: str       # the path the guest opened it by
    node: object    # the VFS file node
    shared_writable: bool = False  # MAP_SHARED with PROT_WRITE

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


class ObjectMap:
    """Non-overlapping file mappings of one address space, sorted by start."""

    def __init__(self):
        self._starts: list[int] = []
        self._maps: list[FileMapping] = []
        self._images: dict[int, ElfImage | None] = {}  # id(node) -> parsed image (link addresses)
        self.main: ElfImage | None = None                # the executable, as loaded
        self.main_node: object | None = None             # ... and its file node

    def fork(self) -> ObjectMap:
        """The same mappings in a forked address space (parsed images are shared)."""
        other = ObjectMap()
        other._starts, other._maps = list(self._starts), list(self._maps)
        other._images = self._images
        other.main, other.main_node = self.main, self.main_node
        return other

    def add(self, start: int, size: int, offset: int, path: str, node, shared_writable: bool = False) -> None:
        self.remove(start, size)
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._maps.insert(i, FileMapping(start, start + size, offset, path, node, shared_writable))

    def has_writable_shared_mapping(self, node) -> bool:
        return any(m.node is node and m.shared_writable for m in self._maps)

    def remove(self, start: int, size: int) -> None:
        """Forget ``[start, start+size)``; mappings cut in two keep their outer pieces."""
        end = start + size
        keep: list[FileMapping] = []
        for m in self._maps:
            if m.end <= start or m.start >= end:
                keep.append(m)
                continue
            if m.start < start:
                keep.append(FileMapping(m.start, start, m.offset, m.path, m.node, m.shared_writable))
            if m.end > end:
                keep.append(FileMapping(end, m.end, m.offset + (end - m.start), m.path, m.node, m.shared_writable))
        keep.sort(key=lambda m: m.start)
        self._maps = keep
        self._starts = [m.start for m in keep]

    def mapping_at(self, addr: int) -> FileMapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._maps[i].start <= addr < self._maps[i].end:
            return self._maps[i]
        return None

    def mappings(self) -> list[FileMapping]:
        return list(self._maps)

    def _image(self, m: FileMapping) -> ElfImage | None:
        key = id(m.node)
        if key not in self._images:
            try:
                data = m.node.read_at(0, m.node.size)
                self._images[key] = parse_elf_bytes(m.path, data, EXECUTABLE)
            except (ElfError, AttributeError):
                self._images[key] = None
        return self._images[key]

    def symbolize(self, addr: int) -> str:
        """``object:symbol+0xN`` in a dynamic program's objects, ``symbol+0xN`` in a static executable."""
        main = self.main
        m = self.mapping_at(addr)
        if m is None or (main is not None and not main.dynamic and m.node is self.main_node):
            return main.symbolize(addr) if main is not None else f"{addr:#010x}"
        image = self._image(m)
        if image is None:
            return f"{m.name}+{addr - m.start + m.offset:#x}"
        link = image.vaddr_of_file_offset(m.offset + (addr - m.start))
        if link is None:
            return f"{m.name}+{addr - m.start + m.offset:#x}"
        sym = image.symbols.containing(link)
        return f"{m.name}:{sym}" if sym else f"{m.name}+{link:#x}"
