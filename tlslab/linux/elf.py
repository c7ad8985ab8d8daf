"""Loading i386 ELF files into guest memory, as Linux's binfmt_elf does.

The kernel's part of dynamic linking, no more: the executable's PT_LOAD
segments, and, when it names a PT_INTERP, the interpreter's (``ld-linux.so.2``);
the guest's own ld.so then maps every library with mmap2, as on Linux. ET_DYN
executables (PIE, static-pie) are placed at the fixed ``ET_DYN_BASE`` (no ASLR:
runs are reproducible), the interpreter top-down in the mmap area, as Linux
places it.

Shared objects are described by :class:`ElfImage` too (for symbols and for
the pre-flight dependency check): ``parse_elf_bytes`` parses any i386 ELF
without touching guest memory, cached by content. Every way a file can be
unusable is one :class:`ElfError` line naming the file.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import os
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.elffile import ELFFile

from tlslab.machine import layout
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE, page_ceil, page_floor

PAGE = layout.PAGE_SIZE
ET_DYN_BASE = 0x0040_0000  # fixed (no ASLR): runs are reproducible; Linux's ELF_ET_DYN_BASE for ia32
STATIC_PIE_BASE = ET_DYN_BASE
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

    def containing(self, addr: int) -> str | None:
        """``"func+0x12"`` only if ``addr`` lies inside a sized symbol, else None."""
        i = bisect.bisect_right(self.starts, addr) - 1
        for j in range(i, max(i - 8, -1), -1):
            start, size, name = self.entries[j]
            if start <= addr < start + max(size, 1):
                return f"{name}+{addr - start:#x}" if addr != start else name
        return None

    def shifted(self, delta: int) -> SymbolTable:
        if not delta or not self.entries:
            return self
        rows = [(a + delta, n, name) for a, n, name in self.entries]
        return SymbolTable([r[0] for r in rows], rows, {k: v + delta for k, v in self.by_name.items()})


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
    interp: str | None = None          # PT_INTERP: the program interpreter's path
    needed: tuple[str, ...] = ()       # DT_NEEDED
    search_path: tuple[str, ...] = ()  # DT_RUNPATH or DT_RPATH entries
    e_type: str = "ET_EXEC"

    @property
    def dynamic(self) -> bool:
        """Linked against shared objects: the kernel must load an interpreter."""
        return self.interp is not None

    def symbolize(self, addr: int) -> str:
        return self.symbols.symbolize(addr)

    @property
    def span(self) -> tuple[int, int]:
        """[lowest page, end of the highest page) the PT_LOAD segments cover."""
        return (page_floor(min(s.vaddr for s in self.segments)),
                page_ceil(max(s.vaddr + s.memsz for s in self.segments)))

    def rebased(self, delta: int) -> ElfImage:
        """The same image loaded ``delta`` bytes higher (ET_DYN objects only)."""
        return dataclasses.replace(
            self, entry=self.entry + delta, phdr=self.phdr + delta if self.phdr else 0,
            load_bias=self.load_bias + delta, brk_start=self.brk_start + delta,
            segments=[dataclasses.replace(x, vaddr=x.vaddr + delta) for x in self.segments],
            tls=dataclasses.replace(self.tls, vaddr=self.tls.vaddr + delta) if self.tls else None,
            symbols=self.symbols.shifted(delta))

    def vaddr_of_file_offset(self, offset: int) -> int | None:
        """The address a byte of the file is loaded at (None: not in any PT_LOAD)."""
        for x in self.segments:
            if x.offset <= offset < x.offset + x.filesz:
                return x.vaddr + (offset - x.offset)
        return None


def _prot(flags: int) -> int:
    return (PROT_READ if flags & PF_R else 0) | (PROT_WRITE if flags & PF_W else 0) | (PROT_EXEC if flags & PF_X else 0)


EXECUTABLE, SHARED_OBJECT = "executable", "shared object"
_ET_NAMES = {1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}


def _check_header(path: str, data: bytes, role: str = EXECUTABLE) -> None:
    if len(data) < 4 or data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    if len(data) < 52:
        raise ElfError(f"{path}: truncated ELF header ({len(data)} bytes)")
    if data[4] == 2:
        raise ElfError(f"{path}: 64-bit ELF (ELFCLASS64): tlslab runs i386 (ELFCLASS32) code only")
    if data[4] != 1 or data[5] != 1:
        raise ElfError(f"{path}: not a little-endian ELFCLASS32 file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != 3:
        raise ElfError(f"{path}: machine {e_machine} is not i386 (EM_386)")
    if role == EXECUTABLE and e_type not in (2, 3):
        raise ElfError(f"{path}: ELF type {e_type} is not an executable (ET_EXEC or ET_DYN)")
    if role == SHARED_OBJECT and e_type != 3:
        raise ElfError(f"{path}: ELF type {_ET_NAMES.get(e_type, e_type)} is not a shared object (ET_DYN)")


def read_elf(path: str | os.PathLike) -> tuple[bytes, ELFFile]:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ElfError(f"{path}: {exc.strerror or exc}") from None
    return data, _elffile(path, data)


def _elffile(path: str, data: bytes, role: str = EXECUTABLE) -> ELFFile:
    _check_header(path, data, role)
    try:
        return ELFFile(io.BytesIO(data))
    except (_PyElfError, struct.error, ValueError) as exc:
        raise ElfError(f"{path}: malformed ELF: {exc}") from None


def _symbols(elf: ELFFile, bias: int) -> SymbolTable:
    """Function and object symbols: .symtab, or .dynsym when the file is stripped (Debian's)."""
    table = SymbolTable()
    try:
        symtab = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
        if symtab is None:
            return table
        rows = []
        for sym in symtab.iter_symbols():
            if sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_GNU_IFUNC") and sym.name and sym["st_value"] \
                    and sym["st_shndx"] != "SHN_UNDEF":
                rows.append((sym["st_value"] + bias, sym["st_size"], sym.name))
    except (_PyElfError, struct.error, ValueError, AttributeError):
        return table
    rows.sort(key=lambda r: (r[0], -r[1]))
    table.entries = rows
    table.starts = [r[0] for r in rows]
    for start, _size, name in rows:
        table.by_name.setdefault(name, start)
    return table


def _dynamic_info(path: str, elf: ELFFile) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DT_NEEDED names, DT_RUNPATH/DT_RPATH directories) of a dynamic object."""
    needed: list[str] = []
    search: list[str] = []
    try:
        dyn = elf.get_section_by_name(".dynamic")
        if dyn is None:
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_DYNAMIC":
                    dyn = seg
                    break
        if dyn is None:
            return (), ()
        for tag in dyn.iter_tags():
            if tag.entry.d_tag == "DT_NEEDED":
                needed.append(tag.needed)
            elif tag.entry.d_tag == "DT_RUNPATH":
                search += [d for d in tag.runpath.split(":") if d]
            elif tag.entry.d_tag == "DT_RPATH":
                search += [d for d in tag.rpath.split(":") if d]
    except (_PyElfError, struct.error, ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise ElfError(f"{path}: malformed dynamic section: {exc}") from None
    return tuple(needed), tuple(search)


def parse_elf(path: str | os.PathLike) -> tuple[bytes, ElfImage]:
    """Validate executable ``path`` and describe its image without touching guest memory.

    ET_DYN executables come back placed at ``ET_DYN_BASE``. Parsing (pyelftools,
    symbol table included) costs ~0.5 s for a static glibc binary, more than a
    short guest run; results are cached per file identity (path, size, mtime,
    inode), so a benchmark worker parses each guest once.
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
    data, _elf = read_elf(path)
    image = parse_elf_bytes(path, data, EXECUTABLE)
    if image.e_type == "ET_DYN":
        image = image.rebased(ET_DYN_BASE)
    _check_fits(image, layout.MMAP_BOTTOM)
    return data, image


def parse_elf_bytes(path: str, data: bytes, role: str = EXECUTABLE) -> ElfImage:
    """Describe an i386 ELF (an executable or a shared object) at its link addresses.

    Cached by content, so a library that many runs map is parsed once per process.
    """
    return dataclasses.replace(_parse_bytes_cached(path, hashlib.blake2b(data, digest_size=16).digest(), role, data))


@functools.lru_cache(maxsize=64)
def _parse_bytes_cached(path: str, _digest: bytes, role: str, data: bytes) -> ElfImage:
    elf = _elffile(path, data, role)
    try:
        phdrs = [seg.header for seg in elf.iter_segments()]
    except (_PyElfError, struct.error, ValueError) as exc:
        raise ElfError(f"{path}: malformed program headers: {exc}") from None
    segments, tls, exec_stack, phdr_addr, interp = [], None, False, None, None
    for p in phdrs:
        kind = p.p_type
        if kind in ("PT_LOAD", PT_LOAD):
            if p.p_filesz > p.p_memsz:
                raise ElfError(f"{path}: PT_LOAD with filesz > memsz")
            if p.p_offset + p.p_filesz > len(data):
                raise ElfError(f"{path}: truncated: PT_LOAD needs bytes up to {p.p_offset + p.p_filesz:#x}, "
                               f"file has {len(data):#x}")
            if p.p_memsz and (p.p_vaddr % PAGE) != (p.p_offset % PAGE):
                raise ElfError(f"{path}: PT_LOAD vaddr and offset disagree modulo the page size")
            if p.p_memsz:
                segments.append(Segment(p.p_vaddr, p.p_memsz, p.p_filesz, p.p_offset, _prot(p.p_flags)))
        elif kind in ("PT_TLS", PT_TLS):
            tls = TlsTemplate(p.p_vaddr, p.p_filesz, p.p_memsz, p.p_align)
        elif kind in ("PT_GNU_STACK", PT_GNU_STACK):
            exec_stack = bool(p.p_flags & PF_X)
        elif kind in ("PT_PHDR", PT_PHDR):
            phdr_addr = p.p_vaddr
        elif kind in ("PT_INTERP", PT_INTERP):
            if p.p_offset + p.p_filesz > len(data) or p.p_filesz < 2:
                raise ElfError(f"{path}: malformed PT_INTERP")
            raw = data[p.p_offset : p.p_offset + p.p_filesz]
            if raw[-1:] != b"\0" or b"\0" in raw[:-1]:
                raise ElfError(f"{path}: PT_INTERP is not a NUL-terminated path")
            interp = os.fsdecode(raw[:-1])
    if not segments:
        raise ElfError(f"{path}: no PT_LOAD segments")
    if role == SHARED_OBJECT and interp is not None and elf["e_type"] != "ET_DYN":
        raise ElfError(f"{path}: not a shared object")
    e_phoff = elf["e_phoff"]
    if phdr_addr is None:
        for x in segments:
            if x.offset <= e_phoff < x.offset + x.filesz:
                phdr_addr = x.vaddr + (e_phoff - x.offset)
                break
        else:
            phdr_addr = 0
    needed, search = _dynamic_info(path, elf)
    end = max(x.vaddr + x.memsz for x in segments)
    return ElfImage(
        path=path, entry=elf["e_entry"], phdr=phdr_addr, phnum=elf["e_phnum"], phent=elf["e_phentsize"],
        load_bias=0, brk_start=page_ceil(end), segments=segments, tls=tls, exec_stack=exec_stack,
        static_pie=elf["e_type"] == "ET_DYN" and interp is None and role == EXECUTABLE,
        symbols=_symbols(elf, 0), interp=interp, needed=needed, search_path=search, e_type=elf["e_type"])


def _check_fits(image: ElfImage, top: int) -> None:
    lo, hi = image.span
    if lo < PAGE or hi > top:
        raise ElfError(f"{image.path}: segments [{lo:#x}, {hi:#x}) do not fit guest user space")


def map_image(mem, data: bytes, image: ElfImage, name: str | None = None) -> None:
    """Map ``image``'s PT_LOAD segments (at their addresses) into ``mem`` and copy the file bytes.

    Pages shared by two segments get the union of their permissions, as the
    file mapping of the page would under Linux; bss is zero-filled.
    """
    name = name or os.path.basename(image.path)
    pages: dict[int, int] = {}
    for x in image.segments:
        for page in range(page_floor(x.vaddr), page_ceil(x.vaddr + x.memsz), PAGE):
            pages[page] = pages.get(page, 0) | x.prot
    run_start, run_prot, prev = None, None, None
    for page in sorted(pages) + [None]:
        if run_start is not None and (page is None or page != prev + PAGE or pages[page] != run_prot):
            mem.map(run_start, prev + PAGE - run_start, run_prot, name)
            run_start = None
        if page is not None and run_start is None:
            run_start, run_prot = page, pages[page]
        prev = page
    for x in image.segments:
        if x.filesz:
            mem.write(x.vaddr, data[x.offset : x.offset + x.filesz])


def load_elf(mem, path: str | os.PathLike) -> ElfImage:
    """Map executable ``path``'s PT_LOAD segments into ``mem`` (a GuestMemory) and return its image."""
    data, image = parse_elf(path)
    map_image(mem, data, image)
    return image


def load_interpreter(mem, path: str, data: bytes) -> ElfImage:
    """Map the program interpreter top-down in the mmap area, as Linux does; its placed image."""
    image = parse_elf_bytes(path, data, SHARED_OBJECT)
    if image.interp is not None:
        raise ElfError(f"{path}: the program interpreter itself names an interpreter ({image.interp})")
    lo, hi = image.span
    try:
        base = mem.find_free(hi - lo)
    except MemoryError:
        raise ElfError(f"{path}: no room for the interpreter in guest user space") from None
    placed = image.rebased(base - lo)
    map_image(mem, data, placed)
    return placed
