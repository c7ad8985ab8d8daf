"""online-rate's clock on the CPU: the supervisor counts the model's instructions between faults.

online-rate (tlslab/hypervisor/strategies/online.py, RateStrategy) decides from
the guest instructions retired since the address space's previous %gs fault,
counted up to RATE_GAP_CAP. The supervisor counts them by single-stepping
(tlslab/hw/supervisor/rate.c). These tests hold that clock to the model's, gap
by gap (the supervisor's ``--trace`` against the gaps the model's rule reads),
on programs written to hit what makes the two differ:

- ``rep`` string instructions of every kind and count, ending on the count or
  on the flag (Unicorn counts N + 1 for N iterations ending on the count);
- system calls between faults (one instruction each) and signal handlers
  entered between them (the kernel's report at a handler's entry is no step);
- ``cpuid`` (glibc's choice of string functions): the guest must see the model
  vCPU's answers (tlslab/machine/cpuid.py), on the CPU as in the model.

Skips (with the reason) where the host cannot run 32-bit code, ptrace is
refused or gcc -m32 -static is missing; under CI=true those become failures.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import GCC32, require_gcc32, unavailable

from tlslab.hw import backend
from tlslab.hw.backend import HwUnavailable
from tlslab.hypervisor.strategies import online
from tlslab.machine.cpuid import SUBLEAVES, model_cpuid_table, render_table

REP_C = r"""
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static volatile int handled;
static void on_usr1(int sig) { handled += sig; }

static __thread volatile int tv;               /* a negative %gs offset (static TLS of the executable) */
static char a[300], b[300];

static void pad(void) {                          /* some 100-150 instructions */
    for (volatile int k = 0; k < 25; k++) { }
}

static unsigned pos(void) {                      /* a positive %gs offset: the TCB's self pointer */
    unsigned v;
    __asm__ volatile("movl %%gs:0, %0" : "=r"(v));
    return v & 1;
}

/* Negative and positive accesses alternate, so faults come in either mode of
 * the rule (emulate: at the negative ones; flip: at every change of sign),
 * with repeated string instructions of every kind and count between them. */
int main(void) {
    unsigned s = 0;
    signal(SIGUSR1, on_usr1);
    for (int n = 0; n < 24; n++) {
        char *d = a; unsigned c = (unsigned)n;
        pad(); tv++;
        if (n % 6 == 0) raise(SIGUSR1);         /* a handler entered between faults (no instruction) */
        __asm__ volatile("cld; rep stosb" : "+D"(d), "+c"(c) : "a"(n) : "memory");
        s += pos();
        const char *p = a, *q = b; c = (unsigned)(n + 1);
        b[n / 2] = (char)(n + 7);               /* repe cmpsb: ends on the flag (n > 0) or the count */
        __asm__ volatile("cld; repe cmpsb" : "+S"(p), "+D"(q), "+c"(c) : : "memory", "cc");
        s += c;
        b[n / 2] = a[n / 2];
        pad(); tv++;
        d = a; c = (unsigned)(n % 5);           /* repne scasb: ends on the count (no such byte) */
        __asm__ volatile("cld; repne scasb" : "+D"(d), "+c"(c) : "a"(0x7f) : "memory", "cc");
        s += c + pos();
        const char *src = b; d = a; c = (unsigned)(n * 3);
        __asm__ volatile("cld; rep movsl" : "+S"(src), "+D"(d), "+c"(c) : : "memory");
        tv++;
        if (n % 4 == 0) s += (unsigned)getuid() & 1;    /* a system call between faults */
        s += pos();
    }
    printf("%u %d %d\n", s, tv, handled);
    return 0;
}
"""

CPUID_C = r"""
#include <cpuid.h>
#include <stdio.h>

int main(void) {
    /* listed leaves, a subleaf past the table's, leaves past the table's ranges */
    unsigned leaves[][2] = {{0, 0}, {1, 0}, {7, 0}, {0xd, 1}, {4, 2}, {0x80000000u, 0}, {0x80000001u, 0},
                            {1, 0x12345}, {0x21, 0}, {0x4000abcdu, 3}, {0x80000031u, 0}};
    for (unsigned i = 0; i < sizeof leaves / sizeof leaves[0]; i++) {
        unsigned a, b, c, d;
        __cpuid_count(leaves[i][0], leaves[i][1], a, b, c, d);
        printf("%x.%x: %08x %08x %08x %08x\n", leaves[i][0], leaves[i][1], a, b, c, d);
    }
    unsigned a = 0, b, c = 0, d;                /* with an operand-size prefix: still cpuid */
    __asm__ volatile(".byte 0x66, 0x0f, 0xa2" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    printf("66: %08x %08x %08x %08x\n", a, b, c, d);
    return 0;
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    require_gcc32()
    out = {}
    d = tmp_path_factory.mktemp("rateclock")
    for name, src in (("rep", REP_C), ("cpuid", CPUID_C)):
        (d / f"{name}.c").write_text(src)
        subprocess.run([*GCC32, "-O1", "-o", str(d / name), str(d / f"{name}.c")], check=True, capture_output=True)
        out[name] = d / name
    try:
        backend.run_hw(out["cpuid"], strategy="native", tree=None)
    except HwUnavailable as exc:
        unavailable(f"hw backend: {exc}")
    return out


def model_counters(result) -> dict:
    return result.counters["strategy"]["by_kind"]


def model_gaps(path, monkeypatch):
    """The model's run under online-rate, and the (eip, gap) pairs its rule read."""
    from tlslab.experiment import RunSpec, execute

    seen = []
    decide = online.RateStrategy.decide

    def recording(self, trap, insn, sign):
        vcpu = trap.domain.vcpu
        last = self._last_at.get(self.space_number(vcpu))
        now = vcpu.instructions_retired()
        seen.append((trap.violation.eip, 0 if last is None else min(now - last, online.RATE_GAP_CAP)))
        return decide(self, trap, insn, sign)

    monkeypatch.setattr(online.RateStrategy, "decide", recording)
    result, _ = execute(RunSpec(str(path), (), strategy="online-rate", tree=None, prices="hw-vm"))
    return result, seen


@pytest.mark.oracle
def test_the_clock_reads_the_model_s_gaps_at_every_fault(programs, monkeypatch, tmp_path):
    model, gaps = model_gaps(programs["rep"], monkeypatch)
    assert model.crash is None and model.status == 0
    trace = tmp_path / "trace"
    hw = backend.run_hw(programs["rep"], strategy="online-rate", tree=None,
                        prices=online.PriceOptions("hw-vm").fault_prices(), trace=trace)
    assert hw.ok and hw.stdout == model.stdout
    hw_gaps = [(int(e, 16), int(g)) for kind, e, g in (line.split() for line in trace.read_text().splitlines()
                                                       if line.startswith("gap "))]
    counted = [g for _, g in gaps if 0 < g < online.RATE_GAP_CAP]   # gaps read in full, not capped
    assert len(counted) >= 24 * 3, gaps
    assert hw_gaps == gaps
    assert hw.online["by_kind"] == model_counters(model)
    assert hw.summary["cpuid"]["refused"] == 0 and hw.summary["cpuid"]["unlisted"] == 0


@pytest.mark.oracle
def test_a_guest_on_the_cpu_sees_the_model_s_cpuid(programs):
    from tlslab.experiment import RunSpec, execute

    model, _ = execute(RunSpec(str(programs["cpuid"]), (), strategy="native", tree=None))
    for strategy in ("native", "emulate"):
        hw = backend.run_hw(programs["cpuid"], strategy=strategy, tree=None, model_cpuid=True)
        assert hw.ok and hw.stdout == model.stdout, (hw.stdout, model.stdout)
        # glibc asks at start-up (the string functions), then the program its 7
        assert hw.summary["cpuid"]["answered"] > 12 and hw.summary["cpuid"]["images"] == 1
        assert hw.summary["cpuid"]["unlisted"] == 0
    rate = backend.run_hw(programs["cpuid"], strategy="online-rate", tree=None,
                          prices=online.PriceOptions("hw-vm").fault_prices())
    assert rate.stdout == model.stdout and rate.summary["cpuid"]["images"] == 1   # online-rate: on by default
    host = backend.run_hw(programs["cpuid"], strategy="native", tree=None)
    assert host.summary["cpuid"]["answered"] == 0        # elsewhere by default: the host's own


def test_the_table_is_the_model_vcpu_s_answer():
    """Every (leaf, subleaf) the table lists is what a model guest reads, one cpuid each; the rendering
    is what the supervisor parses (six hex fields a line)."""
    from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
    from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX

    table = model_cpuid_table()
    assert len({(a.leaf, a.subleaf) for a in table}) == len(table)
    assert {a.subleaf for a in table} == set(range(SUBLEAVES))
    vendor = next(a for a in table if (a.leaf, a.subleaf) == (0, 0))
    assert vendor.eax >= 7                                  # leaf 7 (structured features) is listed and asked
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0x2000, 0x1000)
    uc.mem_write(0x2000, b"\x90\x0f\xa2")                   # at another address, after a nop: the same answer
    for a in table[::97]:
        uc.reg_write(UC_X86_REG_EAX, a.leaf)
        uc.reg_write(UC_X86_REG_ECX, a.subleaf)
        uc.emu_start(0x2000, 0x2003)
        assert tuple(uc.reg_read(r) for r in (UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX)) \
            == (a.eax, a.ebx, a.ecx, a.edx)
    lines = render_table(table).splitlines()
    assert len(lines) == len(table) and all(len(line.split()) == 6 for line in lines)
    assert [int(x, 16) for x in lines[0].split()] == [table[0].leaf, table[0].subleaf, table[0].eax, table[0].ebx,
                                                      table[0].ecx, table[0].edx]


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["default", "nosegneg"])
def test_threads_run_under_online_rate_on_the_cpu(programs, variant):
    """With threads the clock follows the thread that faulted last; a thread that was being stepped
    when another took the clock gets its last step report taken, never a SIGTRAP (it used to die of
    one). Its output is native's; the counts may differ from the model's (rate.c)."""
    from tlslab.experiment import RunSpec

    spec = RunSpec("threads", ("4", "200"), strategy="online-rate", variant=variant, prices="hw-vm")
    hw, _ = backend.run_spec(spec)
    native, _ = backend.run_spec(RunSpec("threads", ("4", "200"), strategy="native", variant=variant))
    assert hw.ok and hw.status == 0 and hw.stdout == native.stdout
    assert hw.summary["delivered"] == 0 and hw.summary["signals_passed"] == native.summary["signals_passed"]
    assert hw.faults > 0 and hw.online["rate_steps"] > 0
