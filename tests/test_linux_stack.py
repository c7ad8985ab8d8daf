"""The initial stack matches Linux i386 create_elf_tables."""

from __future__ import annotations

from tlslab.linux import stack as S
from tlslab.machine import layout
from tlslab.machine.vcpu import VCpu


def _build(argv=(b"prog", b"-R", b"."), envp=(b"PATH=/bin", b"LANG=C")):
    v = VCpu(checks=False)
    v.mem.map(layout.STACK_TOP - 0x10000, 0x10000, 3, "stack")
    spec = S.StackSpec(argv=list(argv), envp=list(envp), execfn=b"/bin/prog", random16=bytes(range(16)),
                       phdr=0x8048034, phent=32, phnum=9, entry=0x8049000)
    return v.mem, S.build_stack(v.mem, layout.STACK_TOP, spec)


def test_round_trip_and_alignment():
    mem, st = _build()
    assert st.sp % 16 == 0
    argv, envp, auxv = S.read_stack(mem, st.sp)
    assert argv == [b"prog", b"-R", b"."] and envp == [b"PATH=/bin", b"LANG=C"]
    assert auxv[S.AT_PHDR] == 0x8048034 and auxv[S.AT_PHENT] == 32 and auxv[S.AT_PHNUM] == 9
    assert auxv[S.AT_ENTRY] == 0x8049000 and auxv[S.AT_PAGESZ] == 4096 and auxv[S.AT_BASE] == 0
    assert auxv[S.AT_SECURE] == 0 and auxv[S.AT_CLKTCK] == 100 and auxv[S.AT_HWCAP] == S.DEFAULT_HWCAP
    assert mem.read(auxv[S.AT_RANDOM], 16) == bytes(range(16))
    assert mem.read_cstring(auxv[S.AT_PLATFORM]) == b"i686"
    assert mem.read_cstring(auxv[S.AT_EXECFN]) == b"/bin/prog"
    assert S.AT_SYSINFO not in auxv  # documented: no vDSO, static glibc ignores it


def test_strings_at_top_in_linux_order():
    mem, st = _build()
    top = layout.STACK_TOP
    assert mem.read(top - 4, 4) == bytes(4)
    assert st.execfn_addr == top - 4 - len(b"/bin/prog\0")
    assert st.argv_addrs[0] < st.argv_addrs[1] < st.argv_addrs[2] < st.envp_addrs[0] < st.execfn_addr
    assert st.random_addr < st.platform_addr < st.argv_addrs[0]
    assert [k for k, _ in st.auxv][-1] == S.AT_NULL


def test_alignment_for_any_argc():
    for n in range(1, 9):
        _, st = _build(argv=[b"a" * k for k in range(1, n + 1)], envp=[b"X=" + b"y" * n])
        assert st.sp % 16 == 0
