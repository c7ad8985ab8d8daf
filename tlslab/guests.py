"""Guest registry: the i386 glibc programs tlslab runs.

Bundled guests are built by ``guests/Makefile`` (``make guests``) into
``guests/bin/<name>`` (default build, static), ``guests/bin/<name>.nosegneg``
(static, ``-mno-tls-direct-seg-refs``) and ``guests/bin/<name>.dyn`` (dynamically
linked PIE: PT_INTERP ``/lib/ld-linux.so.2``, NEEDED ``libc.so.6``) and described
in ``guests/manifest.json``. The
real-world guest ``busybox`` comes from Debian's ``busybox-static:i386`` package,
fetched by :mod:`tlslab.debian` into a cache and pinned in
``guests/debian.lock.json``.

``resolve_guest`` always verifies a bundled or fetched binary's sha256 against
its record, so a result can never silently come from a different binary.

The binary record (``GuestBinary``) lives in :mod:`tlslab.artifacts` and the
``%gs`` census in :mod:`tlslab.census`; both are re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tlslab import debian
from tlslab.artifacts import (  # noqa: F401  (re-exported: the registry's vocabulary)
    VARIANT_SUFFIX,
    VARIANTS,
    GuestBinary,
    GuestError,
    elf_interp,
    guests_dir,
    repo_root,
    sha256_file,
)
from tlslab.census import GS_KINDS, gs_census  # noqa: F401

NOSEGNEG_SUFFIX = VARIANT_SUFFIX["nosegneg"]     # kept for older callers


# --------------------------------------------------------------------------- paths

def manifest_path() -> Path:
    return guests_dir() / "manifest.json"


# --------------------------------------------------------------------------- registry

def load_manifest() -> dict:
    path = manifest_path()
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise GuestError(f"guest manifest {path} is missing: run `make guests`") from None
    except json.JSONDecodeError as exc:
        raise GuestError(f"guest manifest {path} is not valid JSON: {exc}") from None


def _bundled_entries() -> dict[str, dict]:
    return {entry["key"]: entry for entry in load_manifest()["binaries"]}


def list_guests(include_debian: bool = True) -> list[str]:
    """Registry names: bundled ``name`` / ``name.nosegneg`` / ``name.dyn`` and, if locked, ``busybox``."""
    names = sorted(_bundled_entries())
    if include_debian:

        names += sorted(debian.locked_guest_names())
    return names


def _split_name(name: str, variant: str) -> tuple[str, str]:
    """``("lsr.dyn", "default")`` -> ``("lsr", "dyn")``: a variant suffix in the name wins."""
    if variant not in VARIANTS:
        raise GuestError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    # longest suffix first, so that no suffix can shadow a longer one ending the same way
    for var, suffix in sorted(VARIANT_SUFFIX.items(), key=lambda kv: -len(kv[1])):
        if suffix and name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], var
    return name, variant


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith(".") or Path(name).is_file()


def resolve_guest(name_or_path: str, variant: str = "default") -> GuestBinary:
    """Resolve a bundled guest name, ``busybox``, or a path to an ELF file.

    ``"lsr"`` with ``variant="nosegneg"`` and ``"lsr.nosegneg"`` are the same guest
    (likewise ``variant="dyn"`` and ``"lsr.dyn"``).
    Bundled and Debian guests are checked against their recorded sha256; an
    explicit path is taken as is (variant ``"external"``).
    """
    if not name_or_path:
        raise GuestError("empty guest name")
    base, var = _split_name(name_or_path, variant)

    entries = _bundled_entries() if manifest_path().exists() else {}
    key = base + VARIANT_SUFFIX[var]
    if key in entries:
        entry = entries[key]
        path = guests_dir() / entry["path"]
        if not path.is_file():
            raise GuestError(f"guest {key}: {path} is missing: run `make guests`")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise GuestError(
                f"guest {key}: sha256 of {path} is {digest[:16]}..., manifest says "
                f"{entry['sha256'][:16]}...: rebuild with `make guests` or restore the "
                "committed binary"
            )
        return GuestBinary(base, var, path, digest, guests_dir() / entry["source"]["path"], entry)


    if base in debian.GUEST_PACKAGES:
        if var != "default":
            raise GuestError(f"guest {base} has no {var} variant (it is Debian's binary)")
        return debian.resolve_debian_guest(base)

    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise GuestError(f"guest file {path} does not exist")
        return GuestBinary(path.name, "external", path.resolve(), sha256_file(path))

    known = ", ".join(sorted(set(e["name"] for e in entries.values())) + sorted(debian.GUEST_PACKAGES))
    raise GuestError(f"unknown guest {name_or_path!r} (known: {known}; or give a path)")


# --------------------------------------------------------------------------- %gs census

