"""A small, explicit page-cache model: which guest code pages are file pages.

Linux maps a read-only file page (an executable's text) straight from the page
cache: the page a process executes *is* the page ``read(2)`` of that file
copies from. XenLinux's fixup.c patched user code by writing through a kernel
mapping of exactly that page (it refused dirty or anonymous pages, so the page
it patched was always a clean page-cache page) -- and the patch became part of
the file as every reader saw it. prelink read a patched /lib/tls library,
relocated it and wrote a new file: the patch reached the disk (docs/background.md#prelink).

The model, and nothing more:

* ``map_file(node, segments)`` records, for the executable the ELF loader
  mapped, which guest addresses are backed by which file offsets of which
  file node (only the ``filesz`` part of each PT_LOAD: bss is anonymous).
* A code patcher calls ``note_patch(vaddr, old, new, shared)``. ``shared=True``
  means it wrote into the page-cache page (Linux's read-only file mapping, as
  XenLinux did); ``shared=False`` means it first took a private copy-on-write
  copy of the page (the patch lives only in this process's memory).
* ``read()`` of a registered file goes through ``overlay``: bytes covered by a
  shared patch read as the patched bytes. A read that returned patched bytes
  *taints* the process.
* ``write()`` to a regular file goes through ``check_write``: once tainted, a
  write whose data carries a patch's new bytes at that patch's file offset
  (and not its old bytes) is a leak: "patched bytes reached a file". Leaks are
  recorded and passed to ``on_leak`` listeners (the patching strategy counts
  them). Known limits: a patch split across two write() calls, or copied to a
  different offset, is not detected.
* A new mapping of a file (exec, the interpreter, mmap(2)) shows its shared
  patches (``map_file(..., mem)``, each written only over the bytes it was
  made over), as every mapping of a page-cache page does. Address spaces that
  mapped the page *before* the patch get it from the patcher
  (``tlslab.hypervisor.patches``): the model copies pages per process, Linux
  would share the page. Files are told apart by ``file_key`` (host path, or
  the node once the guest has written it). Known limit: a copy of patched
  bytes made through mmap(2) and write(2) is not recorded as a leak (only
  read(2) taints a process: every process maps patched libraries, and a
  one-byte patch matched in any write would be noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def file_key(node) -> tuple:
    """Which file's page-cache pages ``node`` shows: a host file not yet written by the guest is
    its host path (the root's /bin/ls and /proc/self/exe while ls runs are one file); anything else is
    the node itself. Keyed per file, not per node: /proc/self/exe is one node that names whichever
    program runs, so patches keyed to it would land in every later executable."""
    host = getattr(node, "host_path", None)
    if host is not None and not getattr(node, "written", False):
        return ("host", bytes(host))
    return ("node", id(node))


@dataclass(frozen=True)
class FilePatch:
    file: tuple          # file_key of the patched file
    file_offset: int
    vaddr: int
    old: bytes
    new: bytes


@dataclass(frozen=True)
class Leak:
    path: str            # the file written (as the guest named it when it opened it)
    file_offset: int     # where in the written file the patched bytes landed
    vaddr: int           # the patched guest address
    new: bytes

    def describe(self) -> str:
        return (f"patched bytes reached a file: {self.path} offset {self.file_offset:#x} holds "
                f"{self.new.hex(' ')} (the patch at {self.vaddr:#010x})")


@dataclass
class _Mapping:
    node: object
    file: tuple     # its file_key when it was mapped (the node may name another file later)
    vaddr: int
    size: int       # file-backed bytes (filesz)
    offset: int     # file offset of vaddr


@dataclass
class PageCache:
    mappings: list[_Mapping] = field(default_factory=list)
    patches: list[FilePatch] = field(default_factory=list)
    private_patches: int = 0
    mapped_patches: int = 0   # shared patches a new mapping of a patched file showed (map_file)
    tainted_reads: int = 0    # this address space's reads that returned patched bytes (its taint)
    # the same three counted over every address space of the run (shared by every view; as_dict)
    totals: dict = field(default_factory=lambda: {"private_patches": 0, "mapped_patches": 0, "tainted_reads": 0})
    leaks: list[Leak] = field(default_factory=list)
    on_leak: list[Callable[[Leak], None]] = field(default_factory=list)

    def fork(self, keep_mappings: bool = True) -> PageCache:
        """Another address space's view of the same page cache (fork: same mappings; exec: none).

        Patches and leaks are the files' state, shared by every process.
        """
        view = PageCache(mappings=list(self.mappings) if keep_mappings else [], patches=self.patches,
                         leaks=self.leaks, on_leak=self.on_leak, totals=self.totals)
        view.private_patches = self.private_patches if keep_mappings else 0
        return view

    # ------------------------------------------------------------ mapping
    def map_file(self, node, segments, mem=None) -> int:
        """Register the file-backed part of each PT_LOAD (objects with vaddr/filesz/offset).

        With ``mem`` (the address space just mapped), the new mapping shows the page-cache pages
        as they are: every shared patch of the file inside it is written there, in the order
        the patches were made (an un-patch restores). Returns how many were applied.
        """
        applied = 0
        for s in segments:
            if not s.filesz:
                continue
            m = _Mapping(node, file_key(node), s.vaddr, s.filesz, s.offset)
            self.mappings.append(m)
            if mem is None or not self.patches:
                continue
            for p in self.patches:
                if p.file == m.file and m.offset <= p.file_offset and p.file_offset + len(p.new) <= m.offset + m.size:
                    at = m.vaddr + (p.file_offset - m.offset)
                    if mem.read(at, len(p.old)) == p.old:   # the bytes the patch was made over
                        mem.write(at, p.new)
                        applied += 1
        self.mapped_patches += applied
        self.totals["mapped_patches"] += applied
        return applied

    def addresses_of(self, file: tuple, file_offset: int, size: int) -> list[int]:
        """Guest addresses where this address space maps bytes ``[file_offset, +size)`` of ``file``."""
        return [m.vaddr + (file_offset - m.offset) for m in self.mappings
                if m.file == file and m.offset <= file_offset and file_offset + size <= m.offset + m.size]

    def shared_patch_at(self, vaddr: int) -> FilePatch | None:
        """The last shared patch of the page-cache byte behind ``vaddr`` (None: none, or anonymous)."""
        where = self.file_offset(vaddr)
        if where is None:
            return None
        file, off = where
        for p in reversed(self.patches):
            if p.file == file and p.file_offset <= off < p.file_offset + len(p.new):
                return p
        return None

    def unmap(self, start: int, size: int) -> None:
        """Forget file mappings inside ``[start, start+size)`` (munmap, MAP_FIXED over them)."""
        end = start + size
        keep = []
        for m in self.mappings:
            if m.vaddr + m.size <= start or m.vaddr >= end:
                keep.append(m)
                continue
            if m.vaddr < start:
                keep.append(_Mapping(m.node, m.file, m.vaddr, start - m.vaddr, m.offset))
            if m.vaddr + m.size > end:
                keep.append(_Mapping(m.node, m.file, end, m.vaddr + m.size - end, m.offset + (end - m.vaddr)))
        self.mappings = keep

    def file_offset(self, vaddr: int) -> tuple[tuple, int] | None:
        """(file key, file offset) backing guest address ``vaddr``, or None (anonymous)."""
        for m in self.mappings:
            if m.vaddr <= vaddr < m.vaddr + m.size:
                return m.file, m.offset + (vaddr - m.vaddr)
        return None

    # ------------------------------------------------------------ patches
    def note_patch(self, vaddr: int, old: bytes, new: bytes, shared: bool) -> bool:
        """A patcher wrote ``new`` over ``old`` at ``vaddr``; True if a page-cache page changed."""
        where = self.file_offset(vaddr)
        if where is None:
            return False
        if not shared:
            self.private_patches += 1
            self.totals["private_patches"] += 1
            return False
        file, off = where
        self.patches.append(FilePatch(file, off, vaddr, bytes(old), bytes(new)))
        return True

    # ------------------------------------------------------------ I/O hooks
    def overlay(self, node, offset: int, data: bytes) -> bytes:
        """``data`` read from ``node`` at ``offset``, as the (possibly patched) page cache holds it."""
        if not self.patches or not data:
            return data
        file, end = file_key(node), offset + len(data)
        out = None
        for p in self.patches:
            if p.file != file or p.file_offset >= end or p.file_offset + len(p.new) <= offset:
                continue
            if out is None:
                out = bytearray(data)
            for i, b in enumerate(p.new):
                pos = p.file_offset + i - offset
                if 0 <= pos < len(out):
                    out[pos] = b
        if out is None:
            return data
        self.tainted_reads += 1
        self.totals["tainted_reads"] += 1
        return bytes(out)

    def check_write(self, path: bytes, offset: int, data: bytes) -> None:
        """The guest wrote ``data`` at ``offset`` of a regular file named ``path``."""
        if not self.tainted_reads or not self.patches:
            return
        end = offset + len(data)
        for p in self.patches:
            if p.file_offset < offset or p.file_offset + len(p.new) > end or p.new == p.old:
                continue
            pos = p.file_offset - offset
            if data[pos : pos + len(p.new)] == p.new:
                leak = Leak(path.decode(errors="replace"), p.file_offset, p.vaddr, p.new)
                self.leaks.append(leak)
                for listener in self.on_leak:
                    listener(leak)

    def as_dict(self) -> dict:
        """Counts over the whole run (every address space), not this view's."""
        return {"shared_patches": len(self.patches), **self.totals,
                "leaks": [leak.describe() for leak in self.leaks]}
