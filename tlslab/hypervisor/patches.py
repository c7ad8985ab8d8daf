"""Code patches made by the rewriting strategies, as reviewable artefacts.

Every byte a rewriting strategy changes in guest code goes through
:func:`patch_code`, which

* checks the bytes it replaces and writes the new ones into guest memory,
* drops translated code (``VCpu.invalidate_code``),
* tells the process's page cache (``tlslab.linux.pagecache``) -- in ``shared``
  mode the patch lands in the page-cache page of the executable, as
  XenLinux's fixup.c patched /lib/tls (read(2) of the file then returns the
  patched bytes); in ``private`` mode the page is copied first (copy-on-write)
  and the file is untouched,
* records a :class:`Patch` in the strategy's :class:`PatchSet`: site address,
  symbol+offset, file offset in the ELF (through the PT_LOAD segments), old
  and new bytes, and why (strategy, instruction text, kind).

A patch set is written as JSON (:func:`save_patch_set`, one file per guest,
variant and strategy: :func:`default_patch_path`) and can be applied to the
ELF file itself (:func:`apply_to_binary`): the statically rewritten binary.
Only *in-place* patch sets can be applied statically (the ``rewrite`` prefix
rewrite): a ``rewrite-2004`` set calls into an out-of-line buffer at guest
address 0x1000 that exists only while the strategy runs; adding a PT_LOAD
segment for it is not implemented, and applying such a set is refused.

Static-rewrite ABI (``rewrite`` patch sets): the rewritten sites use ``%fs``
for the negative offsets glibc used ``%gs`` for, so whoever runs the binary
must load ``%fs`` with a descriptor that has the TCB base and admits negative
offsets. In tlslab that is the ``fs-twin`` ABI (:mod:`..strategies.rewrite`):
at the guest's first flat set_thread_area (glibc's TCB), the hypervisor
installs, in GDT TLS slot 7, the expand-down twin of the truncated descriptor
(or an exact copy under ``native``) and loads ``%fs`` with selector 0x3b.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import capstone

from tlslab.machine.memory import PROT_WRITE

FORMAT = "tlslab-patch-set/1"
_DISASM = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)


class PatchError(ValueError):
    """A patch set cannot be applied (one-line message)."""


def disassemble(code: bytes, address: int) -> str:
    insn = next(_DISASM.disasm(bytes(code), address, 1), None)
    return f"{insn.mnemonic} {insn.op_str}".strip() if insn is not None else "??"


@dataclass
class Patch:
    address: int                 # guest virtual address of the first changed byte
    symbol: str                  # symbol+offset of that address
    file_offset: int | None      # offset in the ELF file (None: not file-backed, e.g. the 0x1000 buffer)
    old: str                     # hex
    new: str                     # hex
    strategy: str
    kind: str                    # "prefix-65-to-64", "call-fixup", "fixup-stub", "unpatch"
    instruction: str             # the instruction the patch is for (text)
    why: str = ""

    @property
    def old_bytes(self) -> bytes:
        return bytes.fromhex(self.old)

    @property
    def new_bytes(self) -> bytes:
        return bytes.fromhex(self.new)


@dataclass
class PatchSet:
    strategy: str
    guest: str = ""
    variant: str = ""
    binary_sha256: str = ""
    in_place: bool = True            # every patch is inside the ELF file
    abi: str = ""                    # what the runtime must provide (see module docstring)
    out_of_line: dict = field(default_factory=dict)  # rewrite-2004: the fixup buffer (address, size, bytes)
    patches: list[Patch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def sites(self) -> set[int]:
        return {p.address for p in self.patches if p.kind != "fixup-stub"}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT
        for p in d["patches"]:
            p["address"] = f"{p['address']:#010x}"
            if p["file_offset"] is not None:
                p["file_offset"] = f"{p['file_offset']:#x}"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PatchSet":
        if d.get("format") != FORMAT:
            raise PatchError(f"not a tlslab patch set (format {d.get('format')!r}, expected {FORMAT!r})")
        patches = []
        for p in d.get("patches", []):
            p = dict(p)
            p["address"] = int(p["address"], 16)
            p["file_offset"] = None if p["file_offset"] is None else int(p["file_offset"], 16)
            patches.append(Patch(**p))
        fields = {k: v for k, v in d.items() if k not in ("format", "patches")}
        return cls(patches=patches, **fields)


# ---------------------------------------------------------------- live patching
def file_offset_of(image, address: int) -> int | None:
    """ELF file offset of guest ``address`` via the PT_LOAD segments (None: not file-backed)."""
    if image is None:
        return None
    for s in image.segments:
        if s.vaddr <= address < s.vaddr + s.filesz:
            return s.offset + (address - s.vaddr)
    return None


def patch_code(domain, address: int, new: bytes, *, patch_set: PatchSet, kind: str, instruction: str,
               why: str = "", shared: bool = True, expect: bytes | None = None) -> Patch:
    """Write ``new`` over guest code at ``address`` and record it (see the module docstring)."""
    mem = domain.vcpu.mem
    old = mem.read(address, len(new))
    if expect is not None and old != expect:
        raise PatchError(f"code at {address:#010x} is {old.hex()} not {expect.hex()}")
    mem.write(address, new)
    domain.vcpu.invalidate_code(address, len(new))  # also re-reads which segments the sites use
    process = domain.process
    page_cache = getattr(process, "page_cache", None)
    if page_cache is not None:
        where = page_cache.file_offset(address)
        if page_cache.note_patch(address, old, new, shared):   # after the write: address now holds new
            _share_with_live_processes(domain, process, where, old, new)
    image = getattr(process, "image", None)
    if image is not None and getattr(patch_set, "binary_path", None) not in (None, getattr(image, "path", None)):
        image = None   # another program (after an exec): not a place in the set's binary
    patch = Patch(address=address, symbol=domain.symbolize(address), file_offset=file_offset_of(image, address),
                  old=old.hex(), new=bytes(new).hex(), strategy=patch_set.strategy, kind=kind,
                  instruction=instruction, why=why)
    patch_set.patches.append(patch)
    if patch.file_offset is None:
        patch_set.in_place = False
    return patch


def _share_with_live_processes(domain, patcher, where, old: bytes, new: bytes) -> int:
    """A shared patch changed a page-cache page: every live address space mapping that page sees it
    (the model copies pages per process, so the bytes are written into each, the patcher's other
    mappings of the page included; Linux would share the page). Only read-only mappings still
    showing the old bytes: a writable private mapping may hold the guest's own copy. Returns how
    many mappings changed."""
    kernel = getattr(domain, "kernel", None)
    if kernel is None or where is None:
        return 0
    file, offset = where
    changed = 0
    for q in kernel.live_processes():
        if q.vcpu is None or getattr(q, "page_cache", None) is None:
            continue
        for vaddr in q.page_cache.addresses_of(file, offset, len(new)):
            region = q.mem.region_at(vaddr)
            if (region is None or region.prot & PROT_WRITE or not q.mem.is_mapped(vaddr, len(new))
                    or q.mem.read(vaddr, len(old)) != old):
                continue
            q.mem.write(vaddr, new)
            q.vcpu.invalidate_code(vaddr, len(new))
            changed += 1
    return changed


def new_patch_set(domain, strategy: str) -> PatchSet:
    ps = PatchSet(strategy=strategy)
    image = getattr(domain.process, "image", None)
    path = getattr(image, "path", "") if image is not None else ""
    ps.binary_path = path or None   # not part of the record: which program's file offsets the set holds
    if path and os.path.exists(path):
        ps.guest = os.path.basename(path)
        with open(path, "rb") as f:
            ps.binary_sha256 = hashlib.sha256(f.read()).hexdigest()
    return ps


# ---------------------------------------------------------------- artefacts
def default_patch_path(guest: str, variant: str, strategy: str, directory: str | os.PathLike = "patches") -> Path:
    """``patches/<guest>.<variant>.<strategy>.json``."""
    return Path(directory) / f"{guest}.{variant}.{strategy}.json"


def patch_set_of(domain) -> PatchSet:
    ps = getattr(domain.strategy, "patch_set", None)
    if ps is None:
        ps = PatchSet(strategy=domain.strategy.name, notes=[f"strategy {domain.strategy.name} does not patch code"])
    return ps


def save_patch_set(domain, path: str | os.PathLike, guest: str | None = None, variant: str | None = None) -> Path:
    """Write the patch set of ``domain``'s strategy to ``path`` (JSON); returns the path.

    ``guest``/``variant`` label the set (default: the executable's basename, "").
    Patches are written in address order (recording order within a site),
    the out-of-line buffer (if any) as one blob. Works after ``domain.run()``; for a non-patching strategy it
    writes an empty set.
    """
    ps = patch_set_of(domain)
    if guest:
        ps.guest = guest
    if variant:
        ps.variant = variant
    strategy = domain.strategy
    ps.notes = [n for n in ps.notes if not n.startswith("patch policy ")]
    options = getattr(strategy, "options", None)
    if hasattr(options, "patch_policy"):
        ps.notes.append(f"patch policy {options.patch_policy}, page sharing {options.page_sharing}")
    for hazard in getattr(strategy, "hazards", []):
        ps.notes.append(f"hazard: {hazard}")
    d = ps.to_dict()
    d["patches"].sort(key=lambda p: int(p["address"], 16))  # stable: a site's patch precedes its unpatch
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(d, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_patch_set(path: str | os.PathLike) -> PatchSet:
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as exc:
        raise PatchError(f"{path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PatchError(f"{path}: not JSON: {exc}") from None
    try:
        return PatchSet.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, PatchError):
            raise
        raise PatchError(f"{path}: malformed patch set: {exc}") from None


def apply_to_binary(ps: PatchSet, data: bytes) -> bytes:
    """The ELF ``data`` with the in-place patches of ``ps`` applied (old bytes verified)."""
    if not ps.in_place or ps.out_of_line:
        raise PatchError(f"patch set of strategy {ps.strategy} calls into the out-of-line fixup buffer at "
                         f"{ps.out_of_line.get('address', '0x1000')}, which is not in the ELF file: only in-place "
                         "patch sets (strategy rewrite) can be applied statically")
    out = bytearray(data)
    for p in sorted(ps.patches, key=lambda p: p.address):
        if p.file_offset is None:
            raise PatchError(f"patch at {p.address:#010x} is not file-backed")
        old, new = p.old_bytes, p.new_bytes
        cur = bytes(out[p.file_offset : p.file_offset + len(old)])
        if cur != old:
            raise PatchError(f"patch at {p.address:#010x} ({p.symbol}): file offset {p.file_offset:#x} holds "
                             f"{cur.hex() or 'nothing'}, patch set expects {old.hex()} (wrong binary?)")
        out[p.file_offset : p.file_offset + len(new)] = new
    return bytes(out)


def apply_file(patch_set_path: str | os.PathLike, binary: str | os.PathLike, output: str | os.PathLike) -> int:
    """Apply a patch-set file to ``binary``, writing ``output`` (mode 0755); number of patches applied."""
    ps = load_patch_set(patch_set_path)
    try:
        data = Path(binary).read_bytes()
    except OSError as exc:
        raise PatchError(f"{binary}: {exc.strerror or exc}") from None
    # the old-bytes check decides whether the set fits (binary_sha256 is informational)
    out = apply_to_binary(ps, data)
    tmp = Path(str(output) + ".tmp")
    tmp.write_bytes(out)
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)
    return len(ps.patches)
