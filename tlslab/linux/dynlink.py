"""Pre-flight check of a dynamic program's shared objects, before any guest code runs.

The guest's own ld.so does the real loading (mmap2 of each library). But when
a library is missing or unusable, ld.so prints its complaint and exits 127
half-way through a run, and a benchmark would record that as a result. tlslab
checks first, the way ld.so searches (glibc ``elf/dl-load.c``: DT_RPATH when
there is no DT_RUNPATH, LD_LIBRARY_PATH, DT_RUNPATH, ``/etc/ld.so.cache``, then
the system directories), and turns every problem into one line naming the file:
a library that is not in the guest's root, a file that is not an i386 ELF, a
library of the wrong class or machine, a truncated one.

Known gaps (stated, not hidden): ``$ORIGIN``/``$LIB``/``$PLATFORM`` are expanded
for the Debian i386 values; hwcap subdirectories are not searched (a library
found only there is reported missing); a root with ``/etc/ld.so.cache`` may
hold libraries elsewhere, so there a library not found is left to ld.so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tlslab.linux import nodes as N
from tlslab.linux.elf import SHARED_OBJECT, ElfError, ElfImage, parse_elf_bytes
from tlslab.linux.errno import SyscallError

# Debian i386's ld.so system search directories (multiarch first), in order
SYSTEM_DIRS = ("/lib/i386-linux-gnu", "/usr/lib/i386-linux-gnu", "/lib", "/usr/lib")
LD_CACHE = b"/etc/ld.so.cache"
MAX_OBJECTS = 512


@dataclass(frozen=True)
class SharedObject:
    name: str       # as DT_NEEDED names it
    path: str       # where it was found in the guest's root
    needed_by: str


def _expand(directory: str, origin: str) -> str:
    return (directory.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
            .replace("$LIB", "lib/i386-linux-gnu").replace("${LIB}", "lib/i386-linux-gnu")
            .replace("$PLATFORM", "i686").replace("${PLATFORM}", "i686"))


def _regular_file(vfs, path: str):
    try:
        node = vfs.resolve(os.fsencode(path))
    except SyscallError:
        return None
    return node if isinstance(node, N.File) else None


def check_dependencies(vfs, image: ElfImage, env: list[bytes] | tuple[bytes, ...] = ()) -> list[SharedObject]:
    """Every shared object ``image`` needs, transitively, as found in ``vfs``; ElfError on the first problem."""
    ld_library_path: list[str] = []
    for entry in env:
        key, _, value = entry.partition(b"=")
        if key == b"LD_LIBRARY_PATH":
            ld_library_path = [os.fsdecode(d) for d in value.split(b":") if d]
    have_cache = _regular_file(vfs, os.fsdecode(LD_CACHE)) is not None
    found: dict[str, SharedObject] = {}
    queue: list[tuple[ElfImage, str]] = [(image, image.path)]
    while queue:
        obj, obj_path = queue.pop(0)
        origin = os.path.dirname(obj_path) or "/"
        dirs = [_expand(d, origin) for d in obj.search_path] + ld_library_path + list(SYSTEM_DIRS)
        for name in obj.needed:
            if name in found:
                continue
            if len(found) >= MAX_OBJECTS:
                raise ElfError(f"{image.path}: more than {MAX_OBJECTS} shared objects needed")
            candidates = [name] if "/" in name else [os.path.join(d, name) for d in dirs]
            for path in candidates:
                node = _regular_file(vfs, path)
                if node is None:
                    continue
                try:
                    lib = parse_elf_bytes(path, node.read_at(0, node.size), SHARED_OBJECT)
                except ElfError as exc:
                    raise ElfError(f"{exc} (needed by {obj_path})") from None
                found[name] = SharedObject(name, path, obj_path)
                queue.append((lib, path))
                break
            else:
                if have_cache:
                    continue  # ld.so.cache may know a directory we do not search
                raise ElfError(f"{obj_path}: needs {name}, which is not in the guest's root "
                               f"(searched {', '.join(dict.fromkeys(os.path.dirname(c) for c in candidates))})")
    return list(found.values())
