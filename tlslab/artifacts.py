"""What every registry of runnable things shares: the record of a binary, its error, its checksum.

The guest registry (``guests``), the Debian fetchers (``debian``, ``rootfs``)
and the workflows all speak of a ``GuestBinary`` identified by its sha256; this
module holds those few things so that none of the registries needs another
(no import cycles between them).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

VARIANTS = ("default", "nosegneg", "dyn")
#: registry-name / file-name suffix of each bundled build variant
VARIANT_SUFFIX = {"default": "", "nosegneg": ".nosegneg", "dyn": ".dyn"}

class GuestError(ValueError):
    """A guest cannot be resolved or does not match its record (one-line message)."""


@dataclass(frozen=True)
class GuestBinary:
    name: str                 # "lsr", "busybox", or a file's basename for external paths
    variant: str              # "default", "nosegneg", "dyn", "debian" or "external"
    path: Path
    sha256: str
    source: Path | None = None    # C source for bundled guests, the .deb for busybox
    info: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        """The registry name: ``lsr``, ``lsr.nosegneg``, ``lsr.dyn``, ``busybox``."""
        return self.name + VARIANT_SUFFIX.get(self.variant, "")

    @cached_property
    def interp(self) -> str | None:
        """The ELF's PT_INTERP (``/lib/ld-linux.so.2``), None for a static binary."""
        return elf_interp(self.path)

    @property
    def dynamic(self) -> bool:
        """Dynamically linked: the ``dyn`` build, or any ELF with a PT_INTERP."""
        return self.variant == "dyn" or self.interp is not None


#: where a built wheel carries the checkout's ``guests/`` (bins, manifest, locks, sources, boot
#: workload): copied there by ``setup.py``'s ``build_py``; absent in a checkout
PACKAGED_GUESTS = "_guests"


def repo_root() -> Path:
    """The directory holding the ``tlslab`` package: the checkout, or ``site-packages`` when installed.

    Use :func:`checkout_root` to ask whether there is a checkout, and :func:`guests_dir` /
    :func:`bundled_path` for bundled data (they work in both cases)."""
    return Path(__file__).resolve().parent.parent


def checkout_root() -> Path | None:
    """The source checkout this package runs from (editable install / ``python -m`` in the tree), else None."""
    root = repo_root()
    if (root / "pyproject.toml").is_file() and (root / "guests" / "manifest.json").is_file():
        return root
    return None


def guests_dir() -> Path:
    """The bundled guests: ``$TLSLAB_GUESTS_DIR``, else ``guests/`` of the checkout, else the copy an
    installed wheel carries (``tlslab/_guests``). The one resolver of bundled data: everything the
    code names relative to the repository as ``guests/...`` resolves through it."""
    env = os.environ.get("TLSLAB_GUESTS_DIR")
    if env:
        return Path(env)
    checkout = checkout_root()
    if checkout is not None:
        return checkout / "guests"
    return Path(__file__).resolve().parent / PACKAGED_GUESTS


def bundled_path(path: str | os.PathLike) -> Path | None:
    """A repository-relative name of bundled data (``guests/boot``) as a path that exists here, or None.

    Bench specs name bundled data relative to the checkout so that a cell's identity (a hash of its
    RunSpec) does not depend on where tlslab is installed; this maps such a name onto the checkout or
    onto the installed package's copy."""
    rel = Path(path)
    if rel.is_absolute():
        return rel if rel.exists() else None
    checkout = checkout_root()
    if checkout is not None and (checkout / rel).exists():
        return checkout / rel
    parts = rel.parts
    if parts and parts[0] == "guests":
        candidate = guests_dir().joinpath(*parts[1:])
        if candidate.exists():
            return candidate
    return None


def user_cache_dir() -> Path:
    """Where compiled helpers and fetched files go: ``$TLSLAB_CACHE``, else ``~/.cache/tlslab`` -- never
    inside the installed package (``machine/fastpath.py`` says the same for its library: it may not
    import this layer)."""
    env = os.environ.get("TLSLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tlslab"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def elf_interp(path: str | os.PathLike) -> str | None:
    """PT_INTERP of an ELF file from its program headers (no execution, a few reads).

    None if the file is not an ELF or has no PT_INTERP (a static executable).
    """
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
        hdr = f.read(48 if is64 else 36)
        try:
            if is64:
                phoff, = struct.unpack_from(end + "Q", hdr, 16)
                phentsize, phnum = struct.unpack_from(end + "HH", hdr, 38)
            else:
                phoff, = struct.unpack_from(end + "I", hdr, 12)
                phentsize, phnum = struct.unpack_from(end + "HH", hdr, 26)
        except struct.error:
            return None
        if phoff == 0 or phentsize < (56 if is64 else 32):
            return None
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(len(table) // phentsize):
            ph = table[i * phentsize:(i + 1) * phentsize]
            if struct.unpack_from(end + "I", ph, 0)[0] != 3:       # PT_INTERP
                continue
            if is64:
                offset, filesz = struct.unpack_from(end + "Q", ph, 8)[0], struct.unpack_from(end + "Q", ph, 32)[0]
            else:
                offset, filesz = struct.unpack_from(end + "I", ph, 4)[0], struct.unpack_from(end + "I", ph, 16)[0]
            f.seek(offset)
            return f.read(min(filesz, 4096)).split(b"\0", 1)[0].decode(errors="replace")
    return None
