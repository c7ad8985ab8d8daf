"""Watching a strategy work: a recording proxy around any fault strategy.

``RecordingStrategy`` wraps a strategy object (plain objects; the domain only
calls ``handle``/``attach`` and reads ``name``/``counters``/``truncates``) and
records, for every #GP the domain hands it:

* the guest instruction count at the trap (``domain.vcpu.counters.instructions``
  is exact at a trap: the vCPU stops precisely before the faulting
  instruction) -- this is the *fault timeline*;
* per site (EIP): how many traps were resumed, restarted or killed, and the
  last refusal reason -- "handled or refused, and why";
* optionally (``detail=N``) the first N events in full: EIP, offset, size,
  the descriptor before (``violation.descriptor``) and after
  (``domain.vcpu.descriptors[slot]`` once ``handle`` returned) -- which shows
  the flip ping-pong.

``traced_run(spec)`` composes it with :func:`tlslab.experiment.make_domain`:
the domain is built exactly as ``execute`` builds it, then its strategy is
swapped for the proxy (the wrapped strategy is already attached, so it works
on the same domain and keeps its own counters).

``fault_sites`` lists the sites that faulted with their original instruction
(read from the ELF file, not from guest memory, so a rewriting strategy's
patches do not hide the instruction) and the verdicts of the three 2004
decoders (``tlslab.x86.coverage``).
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

import capstone

from tlslab.machine import layout

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)

#: the three historical decoders: label -> (which full strategy's faults they face, predicate name)
HISTORICAL = {
    "emulate-2004": ("emulate", "emulate_2004_handles", "Xen emulate.c (2004)"),
    "flip (seg_fixup)": ("flip-full", "seg_fixup_decodes", "Xen seg_fixup.c (2004)"),
    "rewrite-2004 (fixup.c)": ("flip-full", "fixup_2004_handles", "XenLinux fixup.c (2004)"),
}


def describe_descriptor(desc) -> str | None:
    if desc is None:
        return None
    try:
        return desc.describe()
    except Exception:  # pragma: no cover - defensive
        return repr(desc)


@dataclass
class FaultEvent:
    index: int
    eip: int
    segment: str
    offset: int
    size: int
    write: bool
    instructions: int        # guest instructions retired before this fault
    action: str              # resume | restart | kill
    reason: str
    before: str | None       # descriptor the access violated
    after: str | None        # descriptor in the same slot after the strategy ran
    symbol: str = ""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SiteVerdicts:
    resume: int = 0
    restart: int = 0
    kill: int = 0
    reason: str = ""         # last refusal reason
    min_offset: int | None = None   # signed offsets of the faulting accesses
    max_offset: int | None = None

    def add(self, action: str, reason: str, offset: int) -> None:
        setattr(self, action, getattr(self, action) + 1)
        if action == "kill":
            self.reason = reason
        off = offset - (1 << 32) if offset & 0x80000000 else offset
        if self.min_offset is None or off < self.min_offset:
            self.min_offset = off
        if self.max_offset is None or off > self.max_offset:
            self.max_offset = off

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class RecordingStrategy:
    """A transparent proxy: same name, counters and behaviour, plus a record."""

    def __init__(self, inner, domain=None, detail: int = 0):
        self.inner = inner
        self.domain = domain
        self.detail = detail
        self.trap_instructions = array("Q")
        self.events: list[FaultEvent] = []
        self.site_verdicts: dict[int, SiteVerdicts] = {}

    # --- the Strategy interface, delegated
    def __getattr__(self, name):  # name, description, truncates, counters, ...
        return getattr(self.inner, name)

    def attach(self, domain) -> None:
        self.domain = domain
        self.inner.attach(domain)

    def core_settle(self, domain):
        return None   # every fault must reach ``handle`` to be recorded

    def handle(self, trap):
        domain = self.domain or trap.domain
        v = trap.violation
        n = domain.vcpu.counters.instructions
        self.trap_instructions.append(n)
        verdict = self.inner.handle(trap)
        action = verdict.action.value
        sv = self.site_verdicts.get(v.eip)
        if sv is None:
            sv = self.site_verdicts[v.eip] = SiteVerdicts()
        sv.add(action, verdict.reason, v.offset)
        if len(self.events) < self.detail:
            try:
                after = domain.vcpu.descriptors[layout.selector_index(v.selector)]
            except (IndexError, AttributeError):
                after = None
            self.events.append(FaultEvent(
                index=len(self.trap_instructions) - 1, eip=v.eip, segment=v.segment, offset=v.offset,
                size=v.size, write=bool(v.write), instructions=n, action=action, reason=verdict.reason,
                before=describe_descriptor(v.descriptor), after=describe_descriptor(after),
                symbol=domain.symbolize(v.eip)))
        return verdict

    # --- summaries
    def timeline(self, total_instructions: int, points: int = 200) -> dict:
        return compact_timeline(self.trap_instructions, total_instructions, points)


def compact_timeline(trap_instructions, total_instructions: int, points: int = 200) -> dict:
    """Cumulative faults at ``points`` evenly spaced instruction counts (plus 0).

    A compact, plottable form of "when did the faults happen": x are guest
    instruction counts, y the number of faults taken before x.
    """
    total = max(int(total_instructions), max(trap_instructions, default=0), 1)
    xs = [round(total * i / points) for i in range(points + 1)]
    data = trap_instructions if _is_sorted(trap_instructions) else sorted(trap_instructions)
    ys = [bisect.bisect_right(data, x) for x in xs]
    return {"total_instructions": int(total_instructions), "faults": len(trap_instructions),
            "instructions": xs, "cumulative_faults": ys}


def _is_sorted(seq) -> bool:
    return all(seq[i] <= seq[i + 1] for i in range(len(seq) - 1))


def traced_run(spec, detail: int = 0, trace_signs: bool = False):
    """Run ``spec`` like :func:`tlslab.experiment.execute`, with a ``RecordingStrategy``.

    Returns ``(result, guest, domain, recorder)``. ``trace_signs``: also record
    every address space's %gs sign runs (``Domain.sign_runs``).
    """
    from tlslab.experiment import make_domain

    domain, guest = make_domain(spec, trace_signs=trace_signs)
    recorder = RecordingStrategy(domain.strategy, domain, detail=detail)
    domain.strategy = recorder
    result = domain.run()
    return result, guest, domain, recorder


# --------------------------------------------------------------------------- code bytes

class ElfCode:
    """Original code bytes of an ELF file by virtual address (PT_LOAD segments)."""

    def __init__(self, path):
        from elftools.elf.elffile import ELFFile

        self.ranges: list[tuple[int, int, bytes]] = []
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]:
                    self.ranges.append((seg["p_vaddr"], seg["p_filesz"], seg.data()))

    def read(self, addr: int, size: int = 15) -> bytes:
        for start, length, data in self.ranges:
            if start <= addr < start + length:
                return data[addr - start: addr - start + size]
        return b""


def disassemble(code: bytes, addr: int) -> tuple[str, int]:
    insn = next(_CS.disasm(code, addr, 1), None)
    if insn is None:
        return "(undecodable)", 0
    return f"{insn.mnemonic} {insn.op_str}".strip(), insn.size


def coverage_verdicts(code: bytes, addr: int) -> dict[str, tuple[bool, str]]:
    """The three 2004 decoders' verdicts on one instruction."""
    from tlslab.x86 import coverage
    from tlslab.x86.decode import DecodeError, decode

    insn = decode(code, addr)
    out = {}
    for label, (_full, pred, _src) in HISTORICAL.items():
        if isinstance(insn, DecodeError):
            out[label] = (False, f"cannot decode: {insn}")
            continue
        try:
            ok, why = getattr(coverage, pred)(insn)
        except Exception as exc:  # a predicate bug must not lose the cell
            ok, why = False, f"predicate error: {exc}"
        out[label] = (bool(ok), str(why))
    return out


def fault_sites(result, guest, domain, recorder: RecordingStrategy | None = None) -> list[dict]:
    """Sites that took at least one #GP in this run, with instruction and 2004 coverage."""
    code = ElfCode(guest.path)
    rows = []
    for site in result.sites:
        if not site.get("violations"):
            continue
        eip = site["eip"]
        symbol, mapped = domain.site_code(site)
        raw = (code.read(eip) if "program" not in site else b"") or mapped
        text, size = disassemble(raw, eip)
        row = {
            "eip": eip,
            "segment": site["segment"],
            "symbol": symbol,
            "instruction": text,
            "bytes": raw[:size].hex() if size else raw[:8].hex(),
            "violations": site["violations"],
            "accesses": site["accesses"],
            "negative": site["negative"],
            "positive": site["positive"],
            "min_offset": site["min_offset"],
            "max_offset": site["max_offset"],
            "coverage": {k: list(v) for k, v in coverage_verdicts(raw, eip).items()},
        }
        if "program" in site:
            row["program"] = site["program"]
        if recorder is not None and eip in recorder.site_verdicts:
            sv = recorder.site_verdicts[eip]
            row["verdicts"] = sv.to_dict()
        rows.append(row)
    rows.sort(key=lambda r: -r["violations"])
    return rows
