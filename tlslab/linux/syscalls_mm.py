"""Address-space system calls: brk, mmap2, munmap, mprotect, mremap, madvise, msync.

Mappings are exact (page granular, like Linux), so a guest access past brk or
past a mapping faults as it would natively. File-backed mappings are private
copies of the file's bytes (the bytes past the end of the file in the last
page read zero); MAP_SHARED file writes do not reach the file, and an
anonymous MAP_SHARED mapping is copied into a forked child like a private one
(stated limits: programs that share memory between processes see their own
copies). Every file
mapping is recorded in the process's object map (naming code in shared
objects) and page-cache model (which code pages are file pages: the hazard of
patching them, see ``pagecache``); munmap and MAP_FIXED replacements forget
what they cover.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tlslab.linux import errno as E
from tlslab.linux import nodes as N
from tlslab.linux.errno import SyscallError
from tlslab.linux.syscall_table import signed, syscall
from tlslab.machine import layout
from tlslab.machine.memory import PROT_READ, PROT_WRITE, page_ceil

PAGE = layout.PAGE_SIZE
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x1, 0x2, 0x10, 0x20, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def _overlaps(mem, start: int, size: int) -> bool:
    return any(r.start < start + size and r.end > start for r in mem.regions())


def _refuse_reserved(p, start: int, size: int) -> None:
    """A range the hypervisor owns (``Process.reserved``) is not the guest's to change."""
    for lo, hi, what in getattr(p, "reserved", ()):
        if start < hi and start + size > lo:
            raise SyscallError(E.EINVAL, f"{start:#x}+{size:#x} overlaps {what} ({lo:#x}-{hi:#x})")


@syscall("brk")
def sys_brk(p, addr):
    if addr < p.brk_start:
        return p.brk
    old_top, new_top = page_ceil(p.brk), page_ceil(addr)
    if new_top > old_top:
        if new_top > layout.MMAP_TOP or _overlaps(p.mem, old_top, new_top - old_top):
            return p.brk  # failure: the old break
        p.mem.map(old_top, new_top - old_top, PROT_READ | PROT_WRITE, "[heap]")
    elif new_top < old_top:
        p.mem.unmap(new_top, old_top - new_top)
        forget_mappings(p, new_top, old_top - new_top)   # whatever was mapped there (MAP_FIXED) is gone
    p.brk = addr
    return addr


def do_mmap(p, addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    if length == 0 or offset % PAGE or not flags & (MAP_SHARED | MAP_PRIVATE):
        raise SyscallError(E.EINVAL)
    size = page_ceil(length)
    if size == 0 or size >= layout.USER_TOP:
        raise SyscallError(E.ENOMEM)
    content, f = b"", None
    if not flags & MAP_ANONYMOUS:
        f = p.fds.get(signed(fd))
        if not isinstance(f.node, N.File):
            raise SyscallError(E.ENODEV)
        if not f.readable or (flags & MAP_SHARED and prot & PROT_WRITE and not f.writable):
            raise SyscallError(E.EACCES)
        content = f.node.read_at(offset, size)
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr % PAGE:
            raise SyscallError(E.EINVAL)
        if addr + size > layout.USER_TOP:
            raise SyscallError(E.ENOMEM)
        if flags & MAP_FIXED_NOREPLACE and not flags & MAP_FIXED and _overlaps(p.mem, addr, size):
            raise SyscallError(E.EEXIST)
        _refuse_reserved(p, addr, size)
        start = addr
    elif addr and addr % PAGE == 0 and addr + size <= layout.MMAP_TOP and not _overlaps(p.mem, addr, size):
        start = addr  # a free hint is honoured, as Linux does
    else:
        try:
            start = p.mem.find_free(size)
        except MemoryError:
            raise SyscallError(E.ENOMEM) from None
    name = "[anon]" if f is None else os.path.basename(os.fsdecode(f.path)) or "file"
    p.mem.map(start, size, prot & 7, name)
    forget_mappings(p, start, size)
    if content:
        p.mem.write(start, content)
    if f is not None:
        p.objects.add(start, size, offset, os.fsdecode(f.path), f.node,
                      shared_writable=bool(flags & MAP_SHARED and prot & PROT_WRITE))
        if content:
            p.page_cache.map_file(f.node, [FileRange(start, len(content), offset)], p.mem)
    return start


@dataclass(frozen=True)
class FileRange:
    """The file-backed bytes of one mapping (the page cache's view: vaddr, filesz, offset)."""

    vaddr: int
    filesz: int
    offset: int


def forget_mappings(p, start: int, size: int) -> None:
    """``[start, start+size)`` no longer maps what it mapped (munmap, MAP_FIXED, brk shrink)."""
    p.objects.remove(start, size)
    p.page_cache.unmap(start, size)


@syscall("mmap2")
def sys_mmap2(p, addr, length, prot, flags, fd, pgoff):
    return do_mmap(p, addr, length, prot, flags, fd, pgoff * PAGE)


@syscall("mmap")
def sys_old_mmap(p, args):
    """i386 old_mmap: one pointer to six longs, byte offset."""
    vals = [p.mem.read_u32(args + 4 * i) for i in range(6)]
    return do_mmap(p, *vals)


@syscall("munmap")
def sys_munmap(p, addr, length):
    if addr % PAGE or length == 0 or addr + length > layout.USER_TOP:
        raise SyscallError(E.EINVAL)
    _refuse_reserved(p, addr, page_ceil(length))
    p.mem.unmap(addr, page_ceil(length))
    forget_mappings(p, addr, page_ceil(length))
    return 0


@syscall("mprotect")
def sys_mprotect(p, addr, length, prot):
    if addr % PAGE or prot & ~0x7 & ~0x03000000:  # PROT_GROWSDOWN/UP accepted, ignored
        raise SyscallError(E.EINVAL)
    if length == 0:
        return 0
    if not p.mem.is_mapped(addr, page_ceil(length)):
        raise SyscallError(E.ENOMEM)
    _refuse_reserved(p, addr, page_ceil(length))
    p.mem.protect(addr, page_ceil(length), prot & 7)
    return 0


MS_ASYNC, MS_INVALIDATE, MS_SYNC = 1, 2, 4


@syscall("msync")
def sys_msync(p, addr, length, flags):
    """Argument checks as Linux; nothing to write back (stated in do_mmap: a MAP_SHARED file
    mapping is a private copy in the model)."""
    if addr % PAGE or flags & ~(MS_ASYNC | MS_INVALIDATE | MS_SYNC) or (flags & MS_ASYNC and flags & MS_SYNC):
        raise SyscallError(E.EINVAL)
    if length and not p.mem.is_mapped(addr, page_ceil(length)):
        raise SyscallError(E.ENOMEM)
    return 0


@syscall("mremap")
def sys_mremap(p, old, old_size, new_size, flags, new_addr):
    if old % PAGE or new_size == 0 or flags & MREMAP_FIXED:
        raise SyscallError(E.EINVAL)
    old_size, new_size = page_ceil(old_size), page_ceil(new_size)
    region = p.mem.region_at(old)
    if region is None or not p.mem.is_mapped(old, old_size):
        raise SyscallError(E.EFAULT)
    _refuse_reserved(p, old, max(old_size, new_size))
    if new_size <= old_size:
        if new_size < old_size:
            p.mem.unmap(old + new_size, old_size - new_size)
            forget_mappings(p, old + new_size, old_size - new_size)
        return old
    if old + new_size <= layout.MMAP_TOP and not _overlaps(p.mem, old + old_size, new_size - old_size):
        p.mem.map(old + old_size, new_size - old_size, region.prot, region.name)
        return old
    if not flags & MREMAP_MAYMOVE:
        raise SyscallError(E.ENOMEM)
    data = p.mem.read(old, old_size)
    try:
        start = p.mem.find_free(new_size)
    except MemoryError:
        raise SyscallError(E.ENOMEM) from None
    p.mem.map(start, new_size, region.prot, region.name)
    p.mem.write(start, data)
    p.mem.unmap(old, old_size)
    forget_mappings(p, old, old_size)
    return start


@syscall("madvise")
def sys_madvise(p, addr, length, advice):
    if addr % PAGE:
        raise SyscallError(E.EINVAL)
    if advice == 4 and p.mem.is_mapped(addr, page_ceil(length)):  # MADV_DONTNEED: private pages read zero
        p.mem.write(addr, bytes(page_ceil(length)))
    return 0


@syscall("mincore")
def sys_mincore(p, addr, length, vec):
    """Every mapped guest page is resident (guest memory is host memory we own)."""
    if addr % PAGE:
        raise SyscallError(E.EINVAL)
    pages = page_ceil(length) // PAGE
    if not p.mem.is_mapped(addr, pages * PAGE):
        raise SyscallError(E.ENOMEM)
    p.mem.write(vec, b"\x01" * pages)
    return 0
