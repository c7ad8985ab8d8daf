"""The initial process stack, laid out as Linux i386 ``create_elf_tables`` does.

From the top of the stack down: a 4-byte zero end marker, the AT_EXECFN
string, the envp strings, the argv strings (argv[0] lowest), then (16-byte
aligned) the AT_PLATFORM string and the 16 AT_RANDOM bytes, then argc, argv[],
NULL, envp[], NULL, auxv pairs, AT_NULL, with the final %esp (pointing at argc)
16-byte aligned.

AT_SYSINFO and AT_SYSINFO_EHDR are omitted: there is no vDSO. Static glibc
2.36 ignores AT_SYSINFO anyway (``%gs:0x10`` points at ``int $0x80; ret``
inside libc, docs/measurements.md#glibc), and without AT_SYSINFO_EHDR glibc makes real
``clock_gettime`` system calls, which keeps time under tlslab's control.
AT_RSEQ_* are omitted too: rseq is refused with ENOSYS (see syscalls_proc).
"""

from __future__ import annotations

from dataclasses import dataclass

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN, AT_SYSINFO = 23, 25, 26, 31, 32

# CPUID.1:EDX of a plain 2004-2010-era i686 with SSE2 (fpu vme de pse tsc msr pae mce cx8
# apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht): fixed, not the host's.
DEFAULT_HWCAP = 0x178BFBFF
DEFAULT_HWCAP2 = 0
PLATFORM = b"i686"
CLOCK_TICKS = 100
AUX_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("AT_") and isinstance(v, int)}


@dataclass(frozen=True)
class StackSpec:
    argv: list[bytes]
    envp: list[bytes]
    execfn: bytes
    random16: bytes
    phdr: int
    phent: int
    phnum: int
    entry: int
    base: int = 0                   # AT_BASE: where the program interpreter was loaded (0: none)
    uid: int = 1000
    gid: int = 1000
    hwcap: int = DEFAULT_HWCAP
    hwcap2: int = DEFAULT_HWCAP2


@dataclass(frozen=True)
class InitialStack:
    sp: int                         # %esp at entry: points at argc
    argv_addrs: list[int]
    envp_addrs: list[int]
    auxv: list[tuple[int, int]]     # (type, value) in stack order, AT_NULL last
    execfn_addr: int
    random_addr: int
    platform_addr: int


def _b(s: bytes | str) -> bytes:
    return s.encode() if isinstance(s, str) else bytes(s)


def build_stack(mem, top: int, spec: StackSpec) -> InitialStack:
    """Write the initial stack below ``top`` into ``mem`` (already mapped) and describe it."""
    if len(spec.random16) != 16:
        raise ValueError("AT_RANDOM needs exactly 16 bytes")
    p = top - 4
    mem.write(p, b"\0\0\0\0")

    def push_string(s: bytes) -> int:
        nonlocal p
        data = _b(s) + b"\0"
        p -= len(data)
        mem.write(p, data)
        return p

    execfn_addr = push_string(spec.execfn)
    envp_addrs = [push_string(s) for s in reversed(spec.envp)][::-1]
    argv_addrs = [push_string(s) for s in reversed(spec.argv)][::-1]

    p &= ~0xF
    platform_addr = push_string(PLATFORM)
    p -= 16
    random_addr = p
    mem.write(random_addr, spec.random16)

    auxv = [
        (AT_HWCAP, spec.hwcap), (AT_PAGESZ, 4096), (AT_CLKTCK, CLOCK_TICKS),
        (AT_PHDR, spec.phdr), (AT_PHENT, spec.phent), (AT_PHNUM, spec.phnum),
        (AT_BASE, spec.base), (AT_FLAGS, 0), (AT_ENTRY, spec.entry),
        (AT_UID, spec.uid), (AT_EUID, spec.uid), (AT_GID, spec.gid), (AT_EGID, spec.gid),
        (AT_SECURE, 0), (AT_RANDOM, random_addr), (AT_HWCAP2, spec.hwcap2),
        (AT_EXECFN, execfn_addr), (AT_PLATFORM, platform_addr), (AT_NULL, 0),
    ]
    words = [len(spec.argv), *argv_addrs, 0, *envp_addrs, 0]
    for key, value in auxv:
        words += [key, value]
    sp = (p - 4 * len(words)) & ~0xF
    mem.write(sp, b"".join((w & 0xFFFFFFFF).to_bytes(4, "little") for w in words))
    return InitialStack(sp, argv_addrs, envp_addrs, auxv, execfn_addr, random_addr, platform_addr)


def read_stack(mem, sp: int) -> tuple[list[bytes], list[bytes], dict[int, int]]:
    """Parse an initial stack back (argv, envp, auxv): for tests and inspection."""
    argc = mem.read_u32(sp)
    pos = sp + 4
    argv = [mem.read_cstring(mem.read_u32(pos + 4 * i)) for i in range(argc)]
    pos += 4 * (argc + 1)
    envp = []
    while (a := mem.read_u32(pos)) != 0:
        envp.append(mem.read_cstring(a))
        pos += 4
    pos += 4
    auxv = {}
    while True:
        key, value = mem.read_u32(pos), mem.read_u32(pos + 4)
        pos += 8
        if key == AT_NULL:
            break
        auxv[key] = value
    return argv, envp, auxv
