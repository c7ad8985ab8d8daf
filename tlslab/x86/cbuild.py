"""Compile C sources into a shared object cached by content hash.

tlslab's C parts (the x86 core here, the machine's fast path) are built on
first use with the host compiler, so a fresh clone or an installed wheel needs
no build step beyond ``cc``. It lives in the bottom layer so that every layer
above can use it.

The cache key hashes the sources, the headers they include and the compiler
flags; the object is written under a temporary name and renamed into place, so
concurrent builders (pytest-xdist workers, parallel bench cells) race
harmlessly and a half-written object is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_FLAGS = ("-O2", "-shared", "-fPIC")


class CBuildError(RuntimeError):
    """A C library could not be compiled (no C compiler, or the compiler failed)."""


def cache_dir() -> Path:
    """Where compiled objects live: ``$TLSLAB_CACHE`` or ``~/.cache/tlslab``."""
    root = os.environ.get("TLSLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tlslab")
    return Path(root)


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def source_digest(files: Iterable[Path], flags: Sequence[str] = DEFAULT_FLAGS) -> str:
    """16 hex digits over the files' names and bytes and the flags."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    digest.update("\0".join(flags).encode())
    return digest.hexdigest()[:16]


def library_path(stem: str, sources: Sequence[Path], headers: Sequence[Path] = (),
                 flags: Sequence[str] = DEFAULT_FLAGS) -> Path:
    """The cached object's path for this exact set of sources, headers and flags."""
    return cache_dir() / f"{stem}-{source_digest([*sources, *headers], flags)}.so"


def build_shared_library(stem: str, sources: Sequence[Path], headers: Sequence[Path] = (),
                         flags: Sequence[str] = DEFAULT_FLAGS) -> Path:
    """Compile ``sources`` into ``<cache>/<stem>-<digest>.so`` unless it exists; return its path.

    ``headers`` are hashed (they change the object) but not passed to the
    compiler. Raises :class:`CBuildError` with the compiler's first error line.
    """
    target = library_path(stem, sources, headers, flags)
    if target.exists():
        return target
    cc = find_compiler()
    if not cc:
        raise CBuildError(f"no C compiler found (install gcc): {stem} is compiled on first use")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{stem}-", suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, *map(str, sources)], capture_output=True, text=True)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no message)"])[0]
            raise CBuildError(f"compiling {', '.join(Path(s).name for s in sources)} failed: {first}")
        os.replace(tmp, target)  # atomic: a concurrent builder's identical object is replaced harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
