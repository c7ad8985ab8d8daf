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

This module also holds the ``%gs`` census (:func:`gs_census`): a capstone sweep
of an ELF's executable sections counting ``%gs``-prefixed instructions by
addressing form. The manifest records it for every guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

VARIANTS = ("default", "nosegneg", "dyn")
#: registry-name / file-name suffix of each bundled build variant
VARIANT_SUFFIX = {"default": "", "nosegneg": ".nosegneg", "dyn": ".dyn"}
NOSEGNEG_SUFFIX = VARIANT_SUFFIX["nosegneg"]     # kept for older callers


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


# --------------------------------------------------------------------------- paths

def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def guests_dir() -> Path:
    """``guests/`` of the checkout (override with env ``TLSLAB_GUESTS_DIR``)."""
    env = os.environ.get("TLSLAB_GUESTS_DIR")
    return Path(env) if env else repo_root() / "guests"


def manifest_path() -> Path:
    return guests_dir() / "manifest.json"


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
        from tlslab import debian

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

    from tlslab import debian

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

GS_KINDS = ("zero", "positive", "negative", "indirect")


def _empty_counts() -> dict:
    return {"total": 0, **{k: 0 for k in GS_KINDS}, "negative_offsets": {}}


def _classify(insn) -> str | None:
    """Addressing form of a %gs-overridden memory operand, or None if no %gs operand."""
    from capstone import x86_const as X

    for op in insn.operands:
        if op.type != X.X86_OP_MEM or op.mem.segment != X.X86_REG_GS:
            continue
        if op.mem.base != 0 or op.mem.index != 0:
            return "indirect"
        disp = op.mem.disp & 0xFFFFFFFF
        if disp == 0:
            return "zero"
        return "negative" if disp >= 0x80000000 else "positive"
    # a 0x65 prefix on an instruction without a memory operand (e.g. string ops
    # with an implicit operand, or a stray prefix): count as indirect
    return "indirect" if insn.prefix[1] == 0x65 else None


def _own_function_ranges(elf, source_basename: str) -> list[tuple[int, int]]:
    """Address ranges of functions defined by our own translation unit.

    Local (static) functions follow the STT_FILE symbol of their source file in
    a static executable's .symtab. Globals are not grouped by file: the caller
    adds them by name (see :func:`_global_function_names`).
    """
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return []
    ranges, in_file = [], False
    for sym in symtab.iter_symbols():
        typ = sym["st_info"]["type"]
        if typ == "STT_FILE":
            in_file = sym.name == source_basename
            continue
        if in_file and typ == "STT_FUNC" and sym["st_size"]:
            ranges.append((sym["st_value"], sym["st_value"] + sym["st_size"]))
    return ranges


def _global_function_names(source: Path | None) -> set[str]:
    """Non-static functions defined at column 0 in our (small, house-style) C source."""
    names = {"main"}
    if source is None or not Path(source).is_file():
        return names
    import re

    text = Path(source).read_text(errors="replace")
    pattern = (r"^(?!static\b|extern\b|typedef\b|__attribute__)[A-Za-z_][\w \t*]*?"
               r"\b([A-Za-z_]\w*)\s*\([^;{]*\)\s*\{")
    for m in re.finditer(pattern, text, flags=re.M):
        names.add(m.group(1))
    return names


def gs_census(path: str | os.PathLike, source: str | os.PathLike | None = None) -> dict:
    """Count %gs-prefixed instructions in an i386 ELF by addressing form.

    A linear capstone sweep over every executable section (skipping one byte on
    an undecodable byte). Forms: ``zero`` (``%gs:0``, the TCB self pointer),
    ``positive`` (direct ``%gs:disp``, disp > 0: glibc-private TCB fields),
    ``negative`` (direct ``%gs:-disp``: TLS variables below the TCB, which fault
    under a truncated limit), ``indirect`` (``%gs:(reg)``/``%gs:disp(reg)``:
    offset known only at run time). With ``source``, also the same counts for
    functions from that translation unit (key ``own``).
    """
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs
    from elftools.elf.elffile import ELFFile

    md_lite = Cs(CS_ARCH_X86, CS_MODE_32)
    md = Cs(CS_ARCH_X86, CS_MODE_32)
    md.detail = True
    counts = _empty_counts()
    own = _empty_counts()
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if elf["e_machine"] != "EM_386":
            raise GuestError(f"{path}: not an i386 ELF ({elf['e_machine']})")
        own_ranges = []
        if source is not None:
            src = Path(source)
            own_ranges = _own_function_ranges(elf, src.name)
            wanted = _global_function_names(src)
            symtab = elf.get_section_by_name(".symtab")
            if symtab is not None:
                for sym in symtab.iter_symbols():
                    if (sym.name in wanted and sym["st_info"]["type"] == "STT_FUNC"
                            and sym["st_info"]["bind"] == "STB_GLOBAL" and sym["st_size"]):
                        own_ranges.append((sym["st_value"], sym["st_value"] + sym["st_size"]))
        for sec in elf.iter_sections():
            if sec["sh_type"] != "SHT_PROGBITS" or not (sec["sh_flags"] & 0x4):  # SHF_EXECINSTR
                continue
            code, base = sec.data(), sec["sh_addr"]
            off = 0
            while off < len(code):
                last = off
                for addr, size, _mn, _ops in md_lite.disasm_lite(code[off:], base + off):
                    start = addr - base
                    raw = code[start:start + size]
                    # 0x65 among the legacy prefixes (at most 4 bytes before the opcode)
                    if 0x65 in raw[:5]:
                        insn = next(md.disasm(raw, addr), None)
                        kind = _classify(insn) if insn is not None else None
                        if kind is not None:
                            _add(counts, kind, insn)
                            if any(lo <= addr < hi for lo, hi in own_ranges):
                                _add(own, kind, insn)
                    last = start + size
                off = last if last > off else off + 1
    result = {k: counts[k] for k in ("total", *GS_KINDS)}
    result["negative_offsets"] = dict(sorted(counts["negative_offsets"].items()))
    if source is not None:
        result["own"] = {k: own[k] for k in ("total", *GS_KINDS)}
        result["own"]["negative_offsets"] = dict(sorted(own["negative_offsets"].items()))
    return result


def _add(counts: dict, kind: str, insn) -> None:
    from capstone import x86_const as X

    counts["total"] += 1
    counts[kind] += 1
    if kind == "negative":
        for op in insn.operands:
            if op.type == X.X86_OP_MEM and op.mem.segment == X.X86_REG_GS:
                key = f"-{(-op.mem.disp) & 0xFFFFFFFF:#x}"
                counts["negative_offsets"][key] = counts["negative_offsets"].get(key, 0) + 1
                break
