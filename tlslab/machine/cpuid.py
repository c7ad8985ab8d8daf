"""The model vCPU's answers to ``cpuid``: what a guest learns about "its" processor.

Why it matters beyond curiosity: glibc picks string functions at start-up by
what ``cpuid`` reports (IRELATIVE ifuncs: ``memset`` is ``__memset_sse2`` on
the model's CPU and ``__memset_sse2_rep`` on this host's Xeon, which reports
fast ``rep`` strings). Fault counts do not depend on that choice (no TLS
access there), but the instructions a program retires do. Where they must be
the model's (online-rate's clock, tlslab/hw/supervisor/rate.c, or on request:
``run_hw(model_cpuid=True)``) the hw backend's supervisor turns on CPUID
faulting in every guest image (``arch_prctl(ARCH_SET_CPUID, 0)``, Linux
4.12+, on CPUs that offer it: this host's /proc/cpuinfo lists
``cpuid_fault``) and answers each ``cpuid`` from this table, so a guest on the
CPU takes the model's code paths and retires the model's instructions.

The table is measured, not written: each (leaf, subleaf) is asked of a fresh
Unicorn vCPU of the model's kind (``Uc(UC_ARCH_X86, UC_MODE_32)``, as
``VCpu``), one ``cpuid`` instruction each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX, UC_X86_REG_EIP

#: leaves asked, each with SUBLEAVES subleaves: the basic and extended ranges glibc reads (features,
#: cache and topology leaves 2, 4, 0xb, 0xd, 0x14, 0x19, 0x80000000-0x80000008) and the hypervisor range
LEAF_RANGES = ((0x0, 0x20), (0x4000_0000, 0x4000_0010), (0x8000_0000, 0x8000_0020))
SUBLEAVES = 32
_CODE = 0x1000


@dataclass(frozen=True)
class CpuidAnswer:
    leaf: int
    subleaf: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@functools.lru_cache(maxsize=1)
def model_cpuid_table() -> tuple[CpuidAnswer, ...]:
    """Every (leaf, subleaf) of ``LEAF_RANGES`` x ``SUBLEAVES`` as the model's vCPU answers it."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(_CODE, 0x1000)
    uc.mem_write(_CODE, b"\x0f\xa2")
    out = []
    for first, last in LEAF_RANGES:
        for leaf in range(first, last + 1):
            for sub in range(SUBLEAVES):
                uc.reg_write(UC_X86_REG_EAX, leaf)
                uc.reg_write(UC_X86_REG_ECX, sub)
                uc.reg_write(UC_X86_REG_EIP, _CODE)
                uc.emu_start(_CODE, _CODE + 2, count=1)
                out.append(CpuidAnswer(leaf, sub, *(uc.reg_read(r) for r in (UC_X86_REG_EAX, UC_X86_REG_EBX,
                                                                              UC_X86_REG_ECX, UC_X86_REG_EDX))))
    return tuple(out)


def render_table(table: tuple[CpuidAnswer, ...] | None = None) -> str:
    """The table as the supervisor reads it (``--cpuid PATH``): one answer a line,
    ``leaf subleaf eax ebx ecx edx`` in hex."""
    rows = model_cpuid_table() if table is None else table
    return "".join(f"{a.leaf:x} {a.subleaf:x} {a.eax:x} {a.ebx:x} {a.ecx:x} {a.edx:x}\n" for a in rows)
