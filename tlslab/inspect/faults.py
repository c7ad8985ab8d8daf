"""Where the faults are: per-site view of a guest under one strategy, a fault
trace, and the coverage of the three 2004 decoders.

* :func:`site_table` -- one row per fs/gs instruction site that executed:
  address, symbol+offset, disassembly (capstone, from the ELF file), segment,
  offsets seen (min/max, sign), accesses, faults, and what the strategy did
  (handled: emulated / flipped; refused: the reason).
* :func:`trace` -- the first N fault events in order, with the guest
  instruction count and the descriptor before and after the strategy ran.
* :func:`coverage` -- which faulting sites each historical decoder cannot
  handle: the guest runs under the *full* strategies (``emulate`` for Xen's
  emulate.c, ``flip-full`` for seg_fixup.c and for XenLinux fixup.c, which was
  driven by seg_fixup's notifications), and the coverage predicates of
  :mod:`tlslab.x86.coverage` judge the instruction at every site that faulted.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlslab.experiment import RunSpec
from tlslab.inspect.trace import HISTORICAL, ElfCode, disassemble, fault_sites, traced_run


def _signed(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def fmt_offset(v: int | None) -> str:
    if v is None:
        return "?"
    return f"-{-v:#x}" if v < 0 else f"{v:#x}"


@dataclass
class FaultsView:
    spec: RunSpec
    result: object
    guest: object
    domain: object
    recorder: object
    sites: list[dict]


def investigate(spec: RunSpec, trace_events: int = 0) -> FaultsView:
    result, guest, domain, recorder = traced_run(spec, detail=trace_events)
    code = ElfCode(guest.path)
    rows = []
    for site in result.sites:
        eip = site["eip"]
        symbol, mapped = domain.site_code(site)  # any program of the run: from the file it was mapped from
        raw = (code.read(eip) if "program" not in site else b"") or mapped
        text, _size = disassemble(raw, eip)
        sv = recorder.site_verdicts.get(eip)
        lo, hi = [], []
        if site["accesses"]:
            lo.append(site["min_offset"])
            hi.append(site["max_offset"])
        if sv is not None and sv.min_offset is not None:
            lo.append(sv.min_offset)
            hi.append(sv.max_offset)
        min_off = min(lo) if lo else None
        max_off = max(hi) if hi else None
        faults = site["violations"]
        if not faults:
            handling = "no fault"
        elif sv is None:
            handling = "?"
        elif sv.kill:
            handling = f"REFUSED ({sv.kill}x): {sv.reason}"
            if sv.resume or sv.restart:
                handling += f"; handled {sv.resume + sv.restart}x"
        elif sv.restart and not sv.resume:
            handling = "handled: descriptor flipped, instruction restarted"
        elif sv.resume and not sv.restart:
            handling = "handled: emulated, EIP advanced"
        else:
            handling = f"handled: {sv.resume} resumed, {sv.restart} restarted"
        sign = ("-" if (min_off is not None and min_off < 0) else "") + \
               ("+" if (max_off is not None and max_off >= 0) else "")
        rows.append({
            "eip": eip,
            "symbol": symbol if "program" not in site else f"{site['program'].rsplit('/', 1)[-1]}: {symbol}",
            "instruction": text,
            "segment": site["segment"],
            "min_offset": min_off,
            "max_offset": max_off,
            "sign": sign or "?",
            "accesses": site["accesses"] + (sv.resume if sv else 0),  # emulated accesses happen outside the CPU
            "cpu_accesses": site["accesses"],
            "negative": site["negative"],
            "positive": site["positive"],
            "faults": faults,
            "handled": (sv.resume + sv.restart) if sv else 0,
            "refused": sv.kill if sv else 0,
            "handling": handling,
        })
    return FaultsView(spec, result, guest, domain, recorder, rows)


def sorted_sites(rows: list[dict], key: str) -> list[dict]:
    if key == "faults":
        return sorted(rows, key=lambda r: (-r["faults"], -r["accesses"], r["eip"]))
    if key == "accesses":
        return sorted(rows, key=lambda r: (-r["accesses"], -r["faults"], r["eip"]))
    if key == "address":
        return sorted(rows, key=lambda r: r["eip"])
    raise ValueError(f"unknown sort key {key!r}")


# --------------------------------------------------------------------------- coverage

def coverage(spec: RunSpec) -> dict:
    """For each 2004 decoder: the faulting sites it cannot handle (and those it can).

    Returns ``{"runs": {strategy: summary}, "decoders": {label: {...}}}``.
    """
    from dataclasses import replace

    runs = {}
    needed = sorted({full for full, _pred, _src in HISTORICAL.values()})
    for strategy in needed:
        s = replace(spec, strategy=strategy)
        result, guest, domain, recorder = traced_run(s)
        runs[strategy] = {
            "sites": fault_sites(result, guest, domain, recorder),
            "faults": result.counters["strategy"]["traps"],
            "ok": result.crash is None,
            "crash": result.crash.describe() if result.crash else None,
            "guest": guest,
        }
    decoders = {}
    for label, (full, _pred, source) in HISTORICAL.items():
        sites = runs[full]["sites"]
        unhandled = [dict(s, why=s["coverage"][label][1]) for s in sites if not s["coverage"][label][0]]
        decoders[label] = {
            "source": source,
            "faces": full,
            "sites": len(sites),
            "faults": sum(s["violations"] for s in sites),
            "unhandled": unhandled,
            "unhandled_sites": len(unhandled),
            "unhandled_faults": sum(s["violations"] for s in unhandled),
        }
    return {"runs": runs, "decoders": decoders}
