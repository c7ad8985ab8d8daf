"""The %gs census: a capstone sweep of an ELF's executable sections, by addressing form.

Counts ``%gs``-prefixed instructions as ``zero`` (``%gs:0``), ``positive`` and
``negative`` literal displacements, and ``indirect`` (through a register: the
offset is known only at run time). Guest manifests and the Debian locks record
it for every binary; it is a static fact about code, not about a run.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlslab.artifacts import GuestError

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
