"""Loading static i386 ELF executables into guest memory, as Linux's binfmt_elf does.

Only static executables: tlslab has no dynamic loader, and a dynamically linked
guest would need ``/lib/ld-linux.so.2`` from somewhere. Static-pie (ET_DYN
without PT_INTERP) is loaded at the fixed ``STATIC_PIE_BASE``; glibc relocates
itself. Every way a file can be unusable is one :class:`ElfError` line.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.elffile import ELFFile

from tlslab.machine import layout
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE, page_ceil, page_floor

PAGE = layout.PAGE_SIZE
STATIC_PIE_BASE = 0x0040_0000  # fixed (no ASLR): runs are reproducible
PT_LOAD, PT_INTERP, PT_PHDR, PT_TLS, PT_GNU_STACK = 1, 3, 6, 7, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4


class ElfError(ValueError):
    """The file cannot be run by tlslab (one-line message naming the file)."""


@dataclass(frozen=True)
class Segment:
    vaddr: int      # relocated
    memsz: int
    filesz: int
    offset: int
    prot: int       # Linux PROT_* bits


@dataclass(frozen=True)
class TlsTemplate:
    vaddr: int
    filesz: int
    memsz: int
    align: int


@dataclass
class SymbolTable:
    """Function and object symbols from .symtab, for ``symbolize``."""

    starts: list[int] = field(default_factory=list)
    entries: list[tuple[int, int, str]] = field(default_factory=list)  # (start, size, name)
    by_name: dict[str, int] = field(default_factory=dict)

    def symbolize(self, addr: int) -> str:
        """``"func+0x12"`` for an address inside a known symbol, else the nearest one or hex."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            return f"{addr:#010x}"
        for j in range(i, max(i - 8, -1), -1):  # symbols may nest (aliases, local labels)
            start, size, name = self.entries[j]
            if addr < start + size:
                return f"{name}+{addr - start:#x}" if addr != start else name
        start, _size, name = self.entries[i]
        return f"{name}+{addr - start:#x}" if addr != start else name

    def address_of(self, name: str) -> int | None:
        return self.by_name.get(name)


@dataclass
class ElfImage:
    path: str
    entry: int
    phdr: int           # guest address of the program headers (AT_PHDR)
    phnum: int
    phent: int
    load_bias: int      # 0 for ET_EXEC
    brk_start: int      # page-aligned end of the highest PT_LOAD
    segments: list[Segment]
    tls: TlsTemplate | None
    exec_stack: bool
    static_pie: bool
    symbols: SymbolTable

    def symbolize(self, addr: int) -> str:
        return self.symbols.symbolize(addr)


def _prot(flags: int) -> int:
    return (PROT_READ if flags & PF_R else 0) | (PROT_WRITE if flags & PF_W else 0) | (PROT_EXEC if flags & PF_X else 0)


def _check_header(path: str, data: bytes) -> None:
    if len(data) < 4 or data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    if len(data) < 52:
        raise ElfError(f"{path}: truncated ELF header ({len(data)} bytes)")
    if data[4] == 2:
        raise ElfError(f"{path}: 64-bit ELF (ELFCLASS64): tlslab runs i386 (ELFCLASS32) executables only")
    if data[4] != 1 or data[5] != 1:
        raise ElfError(f"{path}: not a little-endian ELFCLASS32 file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != 3:
        raise ElfError(f"{path}: machine {e_machine} is not i386 (EM_386)")
    if e_type not in (2, 3):
        raise ElfError(f"{path}: ELF type {e_type} is not an executable (ET_EXEC or static-pie ET_DYN)")


def read_elf(path: str | os.PathLike) -> tuple[bytes, ELFFile]:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ElfError(f"{path}: {exc.strerror or exc}") from None
    _check_header(path, data)
    import io

    try:
        return data, ELFFile(io.BytesIO(data))
    except (_PyElfError, struct.error, ValueError) as exc:
        raise ElfError(f"{path}: malformed ELF: {exc}") from None


def _symbols(elf: ELFFile, bias: int) -> SymbolTable:
    table = SymbolTable()
    try:
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            return table
        rows = []
        for sym in symtab.iter_symbols():
            if sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_GNU_IFUNC") and sym.name and sym["st_value"]:
                rows.append((sym["st_value"] + bias, sym["st_size"], sym.name))
    except (_PyElfError, struct.error, ValueError):
        return table
    rows.sort(key=lambda r: (r[0], -r[1]))
    table.entries = rows
    table.starts = [r[0] for r in rows]
    for start, _size, name in rows:
        table.by_name.setdefault(name, start)
    return table


def parse_elf(path: str | os.PathLike) -> tuple[bytes, ElfImage]:
    """Validate ``path`` and describe its image without touching guest memory.

    Parsing (pyelftools, symbol table included) costs ~0.5 s for a static glibc
    binary, more than a short guest run; results are cached per file identity
    (path, size, mtime, inode), so a benchmark worker parses each guest once.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ElfError(f"{path}: {exc.strerror}") from None
    data, image = _parse_elf_cached(path, st.st_size, st.st_mtime_ns, st.st_ino)
    return data, dataclasses.replace(image)  # callers may annotate their copy


@functools.lru_cache(maxsize=32)
def _parse_elf_cached(path: str, _size: int, _mtime_ns: int, _ino: int) -> tuple[bytes, ElfImage]:
    data, elf = read_elf(path)
    try:
        phdrs = [seg.header for seg in elf.iter_segments()]
    except (_PyElfError, struct.error, ValueError) as exc:
        raise ElfError(f"{path}: malformed program headers: {exc}") from None
    if any(p.p_type == "PT_INTERP" or p.p_type == PT_INTERP for p in phdrs):
        raise ElfError(f"{path}: dynamically linked: tlslab runs static executables only")
    static_pie = elf["e_type"] == "ET_DYN"
    bias = STATIC_PIE_BASE if static_pie else 0
    segments, tls, exec_stack, phdr_addr = [], None, False, None
    for p in phdrs:
        kind = p.p_type
        if kind in ("PT_LOAD", PT_LOAD):
            if p.p_filesz > p.p_memsz:
                raise ElfError(f"{path}: PT_LOAD with filesz > memsz")
            if p.p_offset + p.p_filesz > len(data):
                raise ElfError(f"{path}: truncated: PT_LOAD needs bytes up to {p.p_offset + p.p_filesz:#x}, file has {len(data):#x}")
            if p.p_memsz and (p.p_vaddr % PAGE) != (p.p_offset % PAGE):
                raise ElfError(f"{path}: PT_LOAD vaddr and offset disagree modulo the page size")
            segments.append(Segment(p.p_vaddr + bias, p.p_memsz, p.p_filesz, p.p_offset, _prot(p.p_flags)))
        elif kind in ("PT_TLS", PT_TLS):
            tls = TlsTemplate(p.p_vaddr + bias, p.p_filesz, p.p_memsz, p.p_align)
        elif kind in ("PT_GNU_STACK", PT_GNU_STACK):
            exec_stack = bool(p.p_flags & PF_X)
        elif kind in ("PT_PHDR", PT_PHDR):
            phdr_addr = p.p_vaddr + bias
    if not segments:
        raise ElfError(f"{path}: no PT_LOAD segments")
    end = max(s.vaddr + s.memsz for s in segments)
    if min(s.vaddr for s in segments) < PAGE or end > layout.MMAP_BOTTOM:
        raise ElfError(f"{path}: segments [{min(s.vaddr for s in segments):#x}, {end:#x}) do not fit guest user space")
    e_phoff = elf["e_phoff"]
    if phdr_addr is None:
        for s in segments:
            if s.offset <= e_phoff < s.offset + s.filesz:
                phdr_addr = s.vaddr + (e_phoff - s.offset)
                break
        else:
            phdr_addr = 0
    image = ElfImage(
        path=path, entry=elf["e_entry"] + bias, phdr=phdr_addr, phnum=elf["e_phnum"],
        phent=elf["e_phentsize"], load_bias=bias, brk_start=page_ceil(end), segments=segments,
        tls=tls, exec_stack=exec_stack, static_pie=static_pie, symbols=_symbols(elf, bias),
    )
    return data, image


def load_elf(mem, path: str | os.PathLike) -> ElfImage:
    """Map ``path``'s PT_LOAD segments into ``mem`` (a GuestMemory) and return its image.

    Pages shared by two segments get the union of their permissions, as the
    file mapping of the page would under Linux; bss is zero-filled.
    """
    data, image = parse_elf(path)
    pages: dict[int, int] = {}
    for s in image.segments:
        for page in range(page_floor(s.vaddr), page_ceil(s.vaddr + s.memsz), PAGE):
            pages[page] = pages.get(page, 0) | s.prot
    run_start, run_prot, prev = None, None, None
    for page in sorted(pages) + [None]:
        if run_start is not None and (page is None or page != prev + PAGE or pages[page] != run_prot):
            mem.map(run_start, prev + PAGE - run_start, run_prot, os.path.basename(image.path))
            run_start = None
        if page is not None and run_start is None:
            run_start, run_prot = page, pages[page]
        prev = page
    for s in image.segments:
        if s.filesz:
            mem.write(s.vaddr, data[s.offset : s.offset + s.filesz])
    return image
