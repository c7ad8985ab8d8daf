"""The hw supervisor on its own: build, descriptor policy, C emulator semantics, fallback, threads.

The emulation the supervisor runs (the shared x86 core's, tlslab/x86/_core.c) is
checked against the CPU itself: a program exercising every %gs form the core
performs (ALU ops with all flag outcomes, 8/16/32-bit, movzx/movsx, xchg,
cmpxchg, xadd, not/neg, push/pop, call/jmp, SIB, LOCK) on a negative TLS
offset must print exactly what it prints untraced.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import require_gcc32, unavailable

from tlslab.hw.backend import HwError, HwUnavailable, policy_mismatches, run_hw
from tlslab.hw import build
from tlslab.hw.build import cache_dir, source_hash, supervisor_path

pytestmark = [pytest.mark.oracle]

CFLAGS = ["gcc", "-m32", "-O2", "-static"]

SEMANTICS_C = r"""
#include <stdio.h>
#include <stdint.h>
static __thread uint32_t tv[4] __attribute__((aligned(16)));
static int off(void) { return (int)((char *)&tv[0] - (char *)__builtin_thread_pointer()); }
static void show(const char *what, uint32_t a, uint32_t f) { printf("%-12s %08x %03x mem=%08x\n", what, a, f, tv[0]); }
#define ALU_MR(OP) do { uint32_t r = 0x80000001u, f; tv[0] = seed; __asm__ volatile("stc\n\t" OP " %1, %%gs:(%2)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(r), "r"(o) : "cc", "memory"); show(OP "-mr", r, f & 0x8D5); } while (0)
#define ALU_RM(OP) do { uint32_t r = 0x7ffffff0u, f; tv[0] = seed; __asm__ volatile("stc\n\t" OP " %%gs:(%2), %1\n\tpushf\n\tpop %0" : "=r"(f), "+r"(r) : "r"(o) : "cc", "memory"); show(OP "-rm", r, f & 0x8D5); } while (0)
#define ALU_MI(OP, IMM) do { uint32_t f; tv[0] = seed; __asm__ volatile("stc\n\t" OP " $" #IMM ", %%gs:(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show(OP "-mi" #IMM, 0, f & 0x8D5); } while (0)
#define ALU_B(OP) do { uint32_t f; uint8_t r = 0x81; tv[0] = seed; __asm__ volatile("stc\n\t" OP " %1, %%gs:(%2)\n\tpushf\n\tpop %0" : "=r"(f) : "q"(r), "r"(o) : "cc", "memory"); show(OP "-b", r, f & 0x8D5); } while (0)
#define ALU_W(OP) do { uint32_t f; uint16_t r = 0x8001; tv[0] = seed; __asm__ volatile("stc\n\t" OP " %1, %%gs:(%2)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(r), "r"(o) : "cc", "memory"); show(OP "-w", r, f & 0x8D5); } while (0)
static uint32_t target(void) { return 0x1234; }
int main(void) {
    int o = off();
    uint32_t seeds[] = {0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0x7fffffff, 0x80000000u, 0xffffffffu, 0x12345678};
    for (unsigned k = 0; k < sizeof seeds / sizeof *seeds; k++) {
        uint32_t seed = seeds[k];
        printf("seed %08x\n", seed);
        ALU_MR("addl"); ALU_MR("orl"); ALU_MR("adcl"); ALU_MR("sbbl"); ALU_MR("andl"); ALU_MR("subl"); ALU_MR("xorl"); ALU_MR("cmpl"); ALU_MR("testl");
        ALU_RM("addl"); ALU_RM("orl"); ALU_RM("adcl"); ALU_RM("sbbl"); ALU_RM("andl"); ALU_RM("subl"); ALU_RM("xorl"); ALU_RM("cmpl");
        ALU_MI("addl", 1); ALU_MI("subl", -1); ALU_MI("cmpl", 0x7f); ALU_MI("andl", 0x12345); ALU_MI("testl", 0x80000000); ALU_MI("cmpb", 0x80); ALU_MI("addw", 0x7fff); ALU_MI("orw", -2); ALU_MI("adcb", 0x7f);
        ALU_B("addb"); ALU_B("subb"); ALU_B("cmpb"); ALU_B("xorb"); ALU_B("adcb"); ALU_B("sbbb"); ALU_W("addw"); ALU_W("sbbw"); ALU_W("cmpw"); ALU_W("andw");
        { uint32_t f; tv[0] = seed; __asm__ volatile("stc\n\tincl %%gs:(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show("incl", 0, f & 0x8D5); }
        { uint32_t f; tv[0] = seed; __asm__ volatile("clc\n\tdecb %%gs:(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show("decb", 0, f & 0x8D5); }
        { uint32_t f; tv[0] = seed; __asm__ volatile("stc\n\tincw %%gs:(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show("incw", 0, f & 0x8D5); }
        { uint32_t r; tv[0] = seed; __asm__ volatile("movzbl %%gs:1(%1), %0" : "=r"(r) : "r"(o) : "memory"); show("movzb", r, 0); }
        { uint32_t r; tv[0] = seed; __asm__ volatile("movsbl %%gs:(%1), %0" : "=r"(r) : "r"(o) : "memory"); show("movsb", r, 0); }
        { uint32_t r; tv[0] = seed; __asm__ volatile("movswl %%gs:2(%1), %0" : "=r"(r) : "r"(o) : "memory"); show("movsw", r, 0); }
        { uint32_t r; tv[0] = seed; __asm__ volatile("movzwl %%gs:(%1), %0" : "=r"(r) : "r"(o) : "memory"); show("movzw", r, 0); }
        { uint16_t r = 0xaaaa; tv[0] = seed; __asm__ volatile("movw %%gs:(%1), %0" : "+r"(r) : "r"(o) : "memory"); show("movw", r, 0); }
        { uint32_t r = 0x11223344; tv[0] = seed; __asm__ volatile("movb %%gs:1(%1), %%ah" : "+a"(r) : "r"(o) : "memory"); show("movb-ah", r, 0); }
        { uint32_t r = 0x11223344; tv[0] = seed; __asm__ volatile("movb %%bh, %%gs:2(%1)" : : "b"(r), "r"(o) : "memory"); show("movb-bh", r, 0); }
        { uint32_t r = 0xdeadbeef; tv[0] = seed; __asm__ volatile("xchgl %0, %%gs:(%1)" : "+r"(r) : "r"(o) : "memory"); show("xchg", r, 0); }
        { uint32_t r = 5, a = seed, f; tv[0] = seed; __asm__ volatile("lock cmpxchgl %2, %%gs:(%3)\n\tpushf\n\tpop %0" : "=r"(f), "+a"(a) : "r"(r), "r"(o) : "cc", "memory"); show("cmpxchg-eq", a, f & 0x8D5); }
        { uint32_t r = 5, a = 3, f; tv[0] = seed; __asm__ volatile("lock cmpxchgl %2, %%gs:(%3)\n\tpushf\n\tpop %0" : "=r"(f), "+a"(a) : "r"(r), "r"(o) : "cc", "memory"); show("cmpxchg-ne", a, f & 0x8D5); }
        { uint32_t r = 0x10, f; tv[0] = seed; __asm__ volatile("lock xaddl %1, %%gs:(%2)\n\tpushf\n\tpop %0" : "=r"(f), "+r"(r) : "r"(o) : "cc", "memory"); show("xadd", r, f & 0x8D5); }
        { uint32_t r; tv[0] = seed; __asm__ volatile("pushl %%gs:(%1)\n\tpopl %0" : "=r"(r) : "r"(o) : "memory"); show("push", r, 0); }
        { tv[1] = seed; __asm__ volatile("pushl $0x5a5a5a5a\n\tpopl %%gs:4(%0)" : : "r"(o) : "memory"); show("pop", tv[1], 0); }
        { uint32_t r; tv[0] = seed; tv[2] = seed + 7; __asm__ volatile("movl %%gs:(%1,%2,4), %0" : "=r"(r) : "r"(o), "r"(2) : "memory"); show("sib", r, 0); }
        { uint32_t r; tv[0] = seed; __asm__ volatile("testb $1, %%gs:(%1)\n\tsetz %%al\n\tmovzbl %%al, %0" : "=a"(r) : "r"(o) : "cc", "memory"); show("testb", r, 0); }
        { tv[0] = seed; __asm__ volatile("movb $0x77, %%gs:3(%0)\n\tmovw $0x1234, %%gs:(%0)" : : "r"(o) : "memory"); show("movimm", 0, 0); }
        { uint32_t r; tv[3] = (uint32_t)(uintptr_t)target; __asm__ volatile("call *%%gs:12(%1)" : "=a"(r) : "r"(o) : "ecx", "edx", "memory"); show("call", r, 0); }
        { tv[3] = (uint32_t)(uintptr_t)&&landed; __asm__ goto("jmp *%%gs:12(%0)" : : "r"(o) : "memory" : landed); puts("jmp fell through"); landed: show("jmp", tv[3] == (uint32_t)(uintptr_t)&&landed, 0); }
        { uint32_t f; tv[0] = seed; __asm__ volatile("pushl $0x8d7\n\tpopfl\n\tnotl %%gs:(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show("notl", 0, f & 0x8D5); }
        { uint32_t f; tv[0] = seed; __asm__ volatile("clc\n\tnegl %%gs:(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show("negl", 0, f & 0x8D5); }
        { uint32_t f; tv[0] = seed; __asm__ volatile("stc\n\tnegb %%gs:1(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show("negb", 0, f & 0x8D5); }
        { uint32_t f; tv[0] = seed; __asm__ volatile("stc\n\tlock orl $0x100, %%gs:(%1)\n\tpushf\n\tpop %0" : "=r"(f) : "r"(o) : "cc", "memory"); show("lock-or", 0, f & 0x8D5); }
        { char dst[8] = {0}; tv[0] = seed; tv[1] = ~seed; __asm__ volatile("cld\n\trep movsb %%gs:(%%esi), %%es:(%%edi)" : : "S"(o), "D"(dst), "c"(8) : "memory");
          uint32_t a, b; __builtin_memcpy(&a, dst, 4); __builtin_memcpy(&b, dst + 4, 4); show("rep-movsb", a ^ b, 0); }
    }
    return 0;
}
"""

THREADS_C = r"""
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static __thread long counter;
static long results[4];
static void *work(void *arg) {
    long id = (long)arg;
    for (int i = 0; i < 1000; i++) { counter += id; if (close(-1) < 0 && errno == EBADF) counter++; }
    char *p = malloc(100); free(p);
    results[id] = counter;
    return NULL;
}
int main(void) {
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 4; i++) printf("thread %d: %ld\n", i, results[i]);
    printf("main counter %ld\n", counter);
    return 0;
}
"""

FORK_C = r"""
#include <errno.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
static __thread int x;
int main(void) {
    for (int i = 0; i < 100; i++) { x++; close(-1); }
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) { for (int i = 0; i < 100; i++) { x++; close(-1); } printf("child x=%d errno=%d\n", x, errno); fflush(stdout); _exit(3); }
    int st; waitpid(p, &st, 0);
    printf("parent x=%d child status %d\n", x, WEXITSTATUS(st));
    return 0;
}
"""

# a %gs access whose linear address lands in the hypervisor hole: genuine under every strategy
GENUINE_C = r"""
#include <stdio.h>
#include <stdint.h>
int main(void) {
    uint32_t base, v;
    __asm__ volatile("movl %%gs:0, %0" : "=r"(base));
    printf("before\n");
    fflush(stdout);
    uint32_t off = 0xFE000000u - base;     /* linear 0xFE000000: above 0xFC000000 */
    __asm__ volatile("movl %%gs:(%1), %0" : "=r"(v) : "r"(off) : "memory");
    printf("after %u\n", v);
    return 0;
}
"""

# instructions the core refuses to decode: longer than 15 bytes (#GP on the CPU too), and LOCK on
# a mov (#UD, which the CPU raises before any segment check: no #GP, the supervisor never sees it)
BADFORMS_C = r"""
#include <stdio.h>
#include <string.h>
#include <stdint.h>
static __thread uint32_t tv[4];
int main(int argc, char **argv) {
    int o = (int)((char *)&tv[0] - (char *)__builtin_thread_pointer());
    uint32_t v = 0;
    tv[0] = 7;
    __asm__ volatile("movl %%gs:(%1), %0" : "=r"(v) : "r"(o) : "memory"); /* an ordinary fault first */
    printf("before %u\n", v);
    fflush(stdout);
    if (argc < 2) return 0;
    if (!strcmp(argv[1], "long")) /* 14 gs prefixes + 8b 00: 16 bytes */
        __asm__ volatile(".byte 0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x65,0x8b,0x00"
                         : "=a"(v) : "a"(o) : "memory");
    else /* lock movl %gs:(%eax), %eax */
        __asm__ volatile(".byte 0xf0,0x65,0x8b,0x00" : "=a"(v) : "a"(o) : "memory");
    printf("after %u\n", v);
    return 0;
}
"""


def _unavailable(reason: str):
    unavailable(f"hw backend: {reason}")


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    require_gcc32()
    out = tmp_path_factory.mktemp("hwprogs")
    built = {}
    for name, src, extra in (("semantics", SEMANTICS_C, []), ("threads", THREADS_C, ["-pthread"]),
                             ("genuine", GENUINE_C, []), ("fork", FORK_C, []), ("badforms", BADFORMS_C, [])):
        (out / f"{name}.c").write_text(src)
        r = subprocess.run([*CFLAGS, *extra, "-o", str(out / name), str(out / f"{name}.c")], capture_output=True)
        if r.returncode:
            unavailable(f"gcc -m32 -static {' '.join(extra)} failed: {r.stderr.decode()[:200]}")
        built[name] = str(out / name)
    try:
        run_hw(built["semantics"], strategy="native", tree=None)
    except HwUnavailable as exc:
        _unavailable(str(exc))
    return built


def native_stdout(path: str) -> bytes:
    return subprocess.run([path], capture_output=True, check=True, timeout=60).stdout


def test_build_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSLAB_CACHE", str(tmp_path))
    first = supervisor_path()
    assert first.parent == cache_dir() and source_hash() in first.name
    mtime = first.stat().st_mtime_ns
    assert supervisor_path() == first and first.stat().st_mtime_ns == mtime
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".supervisor-")]  # no temp leftovers


def test_source_hash_covers_every_source_and_header(tmp_path, monkeypatch):
    """A change to any .c or .h file of the supervisor, or a new one, or to the shared x86 core it is
    compiled with, makes a new build."""
    copy = tmp_path / "supervisor"
    shutil.copytree(build.SOURCE_DIR, copy)
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    core = tmp_path / "x86"
    core.mkdir()
    for path in build.CORE_SOURCES:
        shutil.copy(path, core / path.name)
    monkeypatch.setattr(build, "CORE_SOURCES", tuple(core / p.name for p in build.CORE_SOURCES))
    names = [p.name for p in build.sources()]
    assert "main.c" in names and "supervisor.h" in names and names == sorted(names)
    assert [p.name for p in build.build_inputs()] == [*names, "_core.c", "_core.h", "_ahead.c", "_ahead.h",
                                                      "_optable.h"]
    seen = {source_hash()}
    for path in (copy / "supervisor.h", copy / "decode.h", copy / "faults.c", core / "_core.c", core / "_core.h",
                 core / "_ahead.c", core / "_optable.h"):
        with open(path, "a") as f:
            f.write("\n")
        seen.add(source_hash())
    (copy / "extra.h").write_text("/* new */\n")
    seen.add(source_hash())
    assert len(seen) == 9


@pytest.mark.parametrize("mode", ["emulate", "step", "flip"])
def test_emulator_semantics_match_the_cpu(progs, mode):
    """Every form the core emulates gives the CPU's own result and flags."""
    exe = progs["semantics"]
    want = native_stdout(exe)
    r = run_hw(exe, strategy="flip" if mode == "flip" else "emulate", tree=None, step_only=(mode == "step"))
    assert r.ok and r.status == 0
    assert r.stdout == want
    assert r.faults > 300
    if mode == "emulate":
        # only the string instruction (a4 = movsb) is left to the single-step fallback
        assert set(r.decoder_misses) == {"a4"}
        assert r.summary["emulated"] + r.summary["stepped"] == r.faults
    if mode == "step":
        assert r.summary["emulated"] == 0 and r.summary["stepped"] == r.faults


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_truncation_matches_python_policy(progs, strategy):
    for profile in ("nonpae", "pae"):
        r = run_hw(progs["semantics"], strategy=strategy, tree=None, profile=profile)
        assert r.summary["tls_installs"] == 1
        assert policy_mismatches(r, profile) == []


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_genuine_fault_is_delivered(progs, strategy):
    """An access into the hypervisor hole is refused (emulate) / not flipped (flip): the guest dies."""
    r = run_hw(progs["genuine"], strategy=strategy, tree=None, stdout="file")
    assert r.signal == 11 and r.status is None
    assert r.stdout == b"before\n"
    assert r.summary["delivered"] == 1
    if strategy == "emulate":
        assert "UNSAFE" in r.summary["first_delivered"]


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_forms_the_core_refuses_behave_as_on_the_cpu(progs, strategy):
    """Longer than 15 bytes: the core refuses it, the step fallback (emulate) or a flip each way (flip)
    faults again, and the guest gets the SIGSEGV it gets natively. LOCK mov: #UD comes before the
    segment check, so there is no #GP to answer: SIGILL, natively and traced alike."""
    exe = progs["badforms"]
    plain = run_hw(exe, argv=[exe], strategy=strategy, tree=None, stdout="file")  # stops before either
    assert plain.ok and plain.status == 0 and plain.stdout == b"before 7\n" and plain.faults > 0
    native = subprocess.run([exe, "long"], capture_output=True, timeout=60)
    assert native.returncode == -11 and native.stdout == b"before 7\n"
    r = run_hw(exe, argv=[exe, "long"], strategy=strategy, tree=None, stdout="file")
    assert r.signal == 11 and r.stdout == b"before 7\n"
    tries = 1 if strategy == "emulate" else 2  # stepped once / flipped down, then faulted in both states
    assert r.faults == plain.faults + tries and r.summary["delivered"] == 1
    assert r.decoder_misses == {"longer than 15 bytes": tries}
    native = subprocess.run([exe, "lock"], capture_output=True, timeout=60)
    assert native.returncode == -4 and native.stdout == b"before 7\n"
    r = run_hw(exe, argv=[exe, "lock"], strategy=strategy, tree=None, stdout="file")
    assert r.signal == 4 and r.stdout == b"before 7\n"
    assert r.faults == plain.faults and r.summary["delivered"] == 0 and r.decoder_misses == {}


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_threads_get_truncated_tls(progs, strategy):
    """CLONE_SETTLS descriptors are truncated before the new thread runs; output unchanged."""
    exe = progs["threads"]
    r = run_hw(exe, strategy=strategy, tree=None)
    assert r.ok and r.stdout == native_stdout(exe)
    assert r.summary["clones"] == 4 and r.summary["tls_installs"] == 5
    assert r.faults > 4 * 1000  # every thread's errno/__thread accesses fault
    assert policy_mismatches(r) == []


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_forked_children_are_traced_too(progs, strategy):
    """A child inherits the truncated (or flipped) descriptor and the supervisor's care."""
    exe = progs["fork"]
    want = run_hw(exe, strategy="untraced", tree=None, stdout="file")
    r = run_hw(exe, strategy=strategy, tree=None, stdout="file")
    assert r.ok and r.stdout == want.stdout == b"child x=200 errno=9\nparent x=100 child status 3\n"
    assert r.summary["forks"] == 1 and r.summary["delivered"] == 0 and r.faults >= 400


def test_untraced_and_native_do_not_fault(progs):
    exe = progs["semantics"]
    for strategy in ("untraced", "native"):
        r = run_hw(exe, strategy=strategy, tree=None)
        assert r.ok and r.faults == 0 and r.stdout == native_stdout(exe)


def test_unpinned_run_works(progs):
    r = run_hw(progs["semantics"], strategy="emulate", tree=None, cpu=None)
    assert r.ok and r.cpu == -1


def test_missing_guest_and_bad_arguments(tmp_path):
    with pytest.raises(HwError):
        run_hw(tmp_path / "nope", strategy="emulate", tree=None)
    with pytest.raises(ValueError):
        run_hw(__file__, strategy="rewrite", tree=None)
    with pytest.raises(ValueError):
        run_hw(__file__, strategy="emulate", stdout="tty", tree=None)


def test_exec_failure_is_reported(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x7fELF not really")
    bogus.chmod(0o755)
    with pytest.raises(HwError, match="execve") as info:
        run_hw(bogus, strategy="emulate", tree=None)
    assert not isinstance(info.value, HwUnavailable)


# ----------------------------------------------------------------- hazard guests on the hardware
def _guest(key: str) -> str:
    from tlslab.guests import GuestError, resolve_guest

    try:
        return str(resolve_guest(key).path)
    except GuestError as exc:
        unavailable(str(exc))


@pytest.mark.parametrize("args", [[], ["ldt"]], ids=["gdt", "ldt"])
@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_fs_user_keeps_its_own_fs_segment(progs, strategy, args):
    """fs-user's own byte-granular %fs segment is below the hole: left alone, output unchanged."""
    exe = _guest("fs-user")
    want = run_hw(exe, ["fs-user", *args], strategy="untraced")
    r = run_hw(exe, ["fs-user", *args], strategy=strategy)
    assert r.ok and r.status == want.status == 0 and r.stdout == want.stdout
    assert r.summary["delivered"] == 0
    assert policy_mismatches(r) == []
    own = [t for t in r.summary["tls"] if t["requested"][1] != r.summary["tls"][0]["requested"][1]]
    assert all(t["installed"] == t["requested"] for t in own)


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_prelink_output_is_unchanged(progs, strategy):
    """No code patching on the hw backend: the 'library' prelink rewrites is byte-identical."""
    from tlslab.linux.tree import SyntheticTree

    exe = _guest("prelink")
    tree = SyntheticTree("small")
    big = max((e for e in tree.entries if e.kind == "file"), key=lambda e: e.size).path
    want = run_hw(exe, ["prelink", big, "out.bin"], strategy="untraced", fresh_tree=True)
    r = run_hw(exe, ["prelink", big, "out.bin"], strategy=strategy, fresh_tree=True)
    assert r.ok and r.status == want.status == 0 and r.stdout == want.stdout
