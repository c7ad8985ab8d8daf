"""Deterministic generation of adversarial guest instruction sequences.

Every sequence is what a hostile (or merely odd) guest could run: it installs
one or two TLS descriptors through the ``set_thread_area`` system call (the
``struct user_desc`` lies in guest memory; ``entry_number = -1`` asks the
kernel to pick a slot and the guest reads the slot back, as glibc does),
loads %gs (and maybe %fs, and rarely %ds/%es/%ss) with them, sets registers,
and then performs memory operations through gs/fs/ds/ss aimed at the limit,
at the hypervisor hole, past 4 GiB and at the user-space top, in every
addressing form. Generation is a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from keystone import KS_ARCH_X86, KS_MODE_32, Ks

from tlslab.machine import layout
from tlslab.x86 import xen
from tlslab.x86.descriptor import UserDesc

KS = Ks(KS_ARCH_X86, KS_MODE_32)

# --- guest memory map used by the harness (all below layout.USER_TOP) -------------
LOW = 0x4000                 # a page near address 0 (bases near 0)
LOW_SIZE = 0x1000
DATA = 0x0810_0000           # user_desc structs, TCBs, scratch
DATA_SIZE = 0x4000
ARGS = DATA                  # struct user_desc #i at ARGS + 16*i
TCB_AREA = DATA + 0x1000
SCRATCH = DATA + 0x3800      # es:edi for string instructions
STACK_LO = layout.USER_TOP - 0x1_0000
STACK_SIZE = 0x1_0000
ESP0 = layout.USER_TOP - 0x100
CODE = 0x0900_0000           # one slot of SLOT bytes per sequence: no code is ever reused
SLOT = 0x400
EXIT_PAD = CODE - 0x10       # `mov eax,1; int 0x80` (a page of pads below CODE)
PAD_PAGE = CODE - 0x1000

U32 = 0xFFFFFFFF
HV_STARTS = tuple(p.hypervisor_start for p in xen.PROFILES.values())
SYS_SET_THREAD_AREA = 243
REGS = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
SELECTORS = {6: 0x33, 7: 0x3B, 8: 0x43}

_ASM_CACHE: dict[str, bytes | None] = {}


def asm(text: str) -> bytes | None:
    """keystone, cached; None if keystone refuses the text."""
    code = _ASM_CACHE.get(text, b"")
    if code == b"":
        try:
            enc, _ = KS.asm(text, CODE)
            code = bytes(enc) if enc else None
        except Exception:
            code = None
        _ASM_CACHE[text] = code
    return code


@dataclass
class Sequence:
    index: int
    descs: list[UserDesc]                      # written at ARGS + 16*i before the run
    lines: list[str] = field(default_factory=list)   # assembly (raw bytes as `.byte`)
    code: bytes = b""
    dropped: int = 0                           # ops keystone refused
    name: str = ""

    def listing(self) -> str:
        out = [f"sequence #{self.index} {self.name}".rstrip()]
        for i, d in enumerate(self.descs):
            out.append(f"  user_desc[{i}] @ {ARGS + 16 * i:#x}: {d}")
        out += [f"    {line}" for line in self.lines]
        return "\n".join(out)


def _line_text(line: str) -> str:
    if line.startswith(".raw "):
        return ".byte " + ", ".join(f"0x{b:02x}" for b in bytes.fromhex(line[5:]))
    return line


def finish(seq: Sequence) -> Sequence:
    """Assemble (no relative branches: bytes are position independent).

    One keystone call for the whole sequence; if keystone refuses it, line by
    line, dropping (and counting) what it refuses.
    """
    try:
        enc, _ = KS.asm("; ".join(_line_text(x) for x in seq.lines), CODE)
        seq.code = bytes(enc)
    except Exception:
        seq.code = b""
    if seq.code:
        if len(seq.code) > SLOT - 16:
            raise ValueError(f"sequence #{seq.index} is {len(seq.code)} bytes, more than a slot")
        return seq
    parts = []
    kept = []
    for line in seq.lines:
        if line.startswith(".raw "):
            parts.append(bytes.fromhex(line[5:]))
            kept.append(line)
            continue
        code = asm(line)
        if code is None:
            seq.dropped += 1
            continue
        parts.append(code)
        kept.append(line)
    seq.lines = kept
    seq.code = b"".join(parts)
    if len(seq.code) > SLOT - 16:
        raise ValueError(f"sequence #{seq.index} is {len(seq.code)} bytes, more than a slot")
    return seq


# ------------------------------------------------------------------ descriptors
def _random_base(r: random.Random) -> int:
    hv = r.choice(HV_STARTS)
    k = r.random()
    if k < 0.30:
        return TCB_AREA + r.randrange(0, 0x1800)               # a real TCB in mapped memory
    if k < 0.40:
        return r.randrange(0, 0x6000)                            # near 0 (incl. LOW page)
    if k < 0.55:
        return (hv - r.choice((0, 1, 2, 4)) * 0x1000 - r.choice((0, 0, 4, 0x800, 0xFFC, 1))) & 0xFFFFFFFF
    if k < 0.63:
        return hv + r.randrange(0, 0x1000) if r.random() < 0.5 else r.randrange(hv, 1 << 32)   # inside the hole
    if k < 0.71:
        return (1 << 32) - r.choice((1, 4, 0x10, 0x800, 0x1000, 0x1004, 0x2000))               # near 4 GiB
    if k < 0.82:
        edge = r.choice((layout.USER_TOP, 0x8000_0000, 0xC000_0000, layout.HYPERVISOR_PAGES, STACK_LO))
        return (edge + r.choice((-0x1000, -4, 0, 4, 0x800))) & 0xFFFFFFFF
    return r.getrandbits(32)


def _random_limit(r: random.Random) -> tuple[int, bool]:
    """(limit, limit_in_pages)."""
    k = r.random()
    if k < 0.45:
        return 0xFFFFF, r.random() < 0.85
    if k < 0.65:
        return r.choice((0, 1, 3, 4, 0xF, 0x10, 0x3F, 0xFF, 0xFFF)), r.random() < 0.3
    if k < 0.85:
        return r.getrandbits(20), r.random() < 0.5
    return r.getrandbits(32), r.random() < 0.5          # the kernel keeps the low 20 bits


def random_user_desc(r: random.Random, entry: int | None = None, base: int | None = None) -> UserDesc:
    limit, pages = _random_limit(r)
    if entry is None:
        entry = 0xFFFFFFFF if r.random() < 0.6 else r.choice((6, 7, 7, 8))
    return UserDesc(
        entry_number=entry,
        base_addr=_random_base(r) if base is None else base,
        limit=limit,
        seg_32bit=r.random() < 0.95,
        contents=1 if r.random() < 0.3 else 0,
        read_exec_only=r.random() < 0.1,
        limit_in_pages=pages,
        seg_not_present=r.random() < 0.03,
        useable=r.random() < 0.5,
    )


# ------------------------------------------------------------------ offsets
def _descriptor_geometry(ud: UserDesc) -> list[int]:
    """Interesting offsets for a request: around its limit, truncated limits, the hole, 4 GiB."""
    d = ud.to_descriptor()
    out = [d.effective_limit]
    for prof in xen.PROFILES.values():
        t = xen.truncate(d, prof)
        out.append(t.effective_limit)
        f = xen.flip(t, 0xFFFFFFFC, prof, size=4)
        if f is not None:
            out.append(f.effective_limit)
    base = ud.base_addr
    for hv in HV_STARTS:
        out += [(hv - base) & 0xFFFFFFFF, (hv - base - 4) & 0xFFFFFFFF, (hv - base - 1) & 0xFFFFFFFF]
    for edge in (layout.USER_TOP, 0x8000_0000, 0xC000_0000, layout.HYPERVISOR_PAGES, 0xFFFFF000, 0):
        out.append((edge - base) & 0xFFFFFFFF)
    return out


def random_offset(r: random.Random, ud: UserDesc | None) -> int:
    k = r.random()
    if k < 0.25:
        return (-r.choice((1, 2, 4, 8, 0x14, 0x20, 0x24, 0x100, 0x7FC, 0x1000))) & 0xFFFFFFFF   # TLS -ve
    if k < 0.40:
        return r.choice((0, 4, 8, 0xC, 0x10, 0x14, 0x18, 0x40, 0x7FC))                     # TCB +ve
    if k < 0.70 and ud is not None:
        return (r.choice(_descriptor_geometry(ud)) + r.randrange(-8, 9)) & 0xFFFFFFFF        # at/around edges
    if k < 0.80:
        return (0xFFFFFFFF - r.randrange(0, 8)) & 0xFFFFFFFF                                  # wrap attempts
    if k < 0.88:
        return (r.choice((0x8000_0000, 0x4000_0000, 0xC000_0000, 0x7FFF_FFFF)) + r.randrange(-8, 9)) & 0xFFFFFFFF
    return r.getrandbits(32)


def ds_target(r: random.Random) -> int:
    """Plain (ds) linear targets: the hole, just below it, the kernel/hypervisor pages, 4 GiB."""
    hv = r.choice(HV_STARTS)
    return r.choice((
        hv + r.randrange(-8, 9), hv + r.randrange(0, 0x100_0000), 0xFFFFF000 + r.randrange(0, 0x1000),
        0xC000_0000 + r.randrange(-8, 0x1000), layout.USER_TOP + r.randrange(-8, 9),
        layout.HYPERVISOR_PAGES + r.randrange(0, 0x4000), 0x8000_0000 + r.randrange(-8, 0x1000),
        0xFFFFFFFC + r.randrange(0, 4), r.getrandbits(32), DATA + r.randrange(0, DATA_SIZE - 8),
    )) & 0xFFFFFFFF


# ------------------------------------------------------------------ operand forms
def _h(x: int) -> str:
    return f"{x & 0xFFFFFFFF:#x}"


def memory_operand(r: random.Random, seg: str, offset: int, pre: list[str], avoid: set[str]) -> str:
    """An operand `seg:[...]` whose effective address is ``offset``; register set-up goes to ``pre``."""
    regs = [x for x in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp") if x not in avoid]
    k = r.random()
    p = f"{seg}:" if seg else ""
    if k < 0.30 or not regs:
        return f"{p}[{_h(offset)}]"
    base = r.choice(regs)
    if k < 0.55:
        pre.append(f"mov {base}, {_h(offset)}")
        return f"{p}[{base}]"
    if k < 0.75:
        disp = r.choice((r.randrange(-128, 128), r.getrandbits(32) - (1 << 31)))
        pre.append(f"mov {base}, {_h(offset - disp)}")
        return f"{p}[{base} {'+' if disp >= 0 else '-'} {abs(disp):#x}]"
    index = r.choice([x for x in regs if x != base] or [base])
    scale = r.choice((1, 2, 4, 8))
    iv = r.getrandbits(32) if r.random() < 0.5 else r.randrange(-16, 17)
    disp = r.choice((0, r.randrange(-128, 128), r.getrandbits(32) - (1 << 31)))
    bv = (offset - iv * scale - disp) & 0xFFFFFFFF
    if index == base:
        pre.append(f"mov {base}, {_h((offset - disp) * pow(1 + scale, -1, 1 << 32) if (1 + scale) % 2 else offset)}")
        if (1 + scale) % 2 == 0:
            return f"{p}[{base}]"
    else:
        pre.append(f"mov {base}, {_h(bv)}")
        pre.append(f"mov {index}, {_h(iv)}")
    sign = "+" if disp >= 0 else "-"
    return f"{p}[{base} + {index}*{scale} {sign} {abs(disp):#x}]"


def memory_op(r: random.Random, seg: str, offset: int) -> list[str]:
    """One memory instruction (with its register set-up) at ``seg:offset``."""
    pre: list[str] = []
    k = r.random()
    if k < 0.08:  # string instructions: source seg:esi, destination es:edi (SCRATCH)
        pre += [f"mov esi, {_h(offset)}", f"mov edi, {SCRATCH + r.randrange(0, 0x100):#x}", f"mov ecx, {r.randrange(1, 4)}"]
        form = r.choice(("lodsd eax, dword ptr {s}[esi]", "movsd dword ptr es:[edi], dword ptr {s}[esi]",
                         "rep movsb byte ptr es:[edi], byte ptr {s}[esi]", "cmpsd dword ptr {s}[esi], dword ptr es:[edi]",
                         "lodsb al, byte ptr {s}[esi]", "rep lodsd eax, dword ptr {s}[esi]"))
        return pre + [form.format(s=f"{seg}:" if seg else "")]
    if k < 0.12:  # bit instructions with a register bit offset reach EA + (bitoff >> 3)
        pre.append(f"mov eax, {_h(r.choice((r.getrandbits(32), r.randrange(-64, 64), 0x7FFFFFFF, 0x80000000)))}")
        m = memory_operand(r, seg, offset, pre, {"eax"})
        return pre + [f"{r.choice(('bt', 'bts', 'btr', 'btc'))} dword ptr {m}, eax"]
    if k < 0.16:  # 16-bit address size: [bx+si] style, offset within 64 KiB
        pre += [f"mov ebx, {r.randrange(0, 0x10000):#x}", f"mov esi, {r.randrange(0, 0x10000):#x}"]
        p = f"{seg}:" if seg else ""
        return pre + [r.choice((f"mov ax, word ptr {p}[bx + si]", f"mov word ptr {p}[bx + si], ax",
                                f"inc byte ptr {p}[bx]", f"mov eax, dword ptr {p}[bp + di + 0x7fff]"))]
    m = memory_operand(r, seg, offset, pre, set())
    forms = (
        # reads
        "mov eax, dword ptr {m}", "mov cl, byte ptr {m}", "movzx edx, word ptr {m}", "mov ax, word ptr {m}",
        "cmp dword ptr {m}, 0x12345678", "cmp byte ptr {m}, 7", "cmp dword ptr {m}, ecx", "add edx, dword ptr {m}",
        "movsx eax, byte ptr {m}", "imul ecx, dword ptr {m}", "test dword ptr {m}, edx",
        # writes
        "mov dword ptr {m}, edx", "mov byte ptr {m}, 0x5a", "mov dword ptr {m}, 0xdeadbeef", "mov word ptr {m}, cx",
        # read-modify-write
        "add dword ptr {m}, 5", "add dword ptr {m}, 0x12345", "inc dword ptr {m}", "dec byte ptr {m}",
        "xchg dword ptr {m}, ecx", "cmpxchg dword ptr {m}, edx", "xadd dword ptr {m}, ecx", "not dword ptr {m}",
        "or word ptr {m}, 1", "sub dword ptr {m}, edx", "lock add dword ptr {m}, 1", "lock xchg dword ptr {m}, eax",
        # stack through memory, control transfer through memory
        "push dword ptr {m}", "pop dword ptr {m}", "push word ptr {m}", "call dword ptr {m}", "jmp dword ptr {m}",
        # wide accesses
        "fld qword ptr {m}", "fld tbyte ptr {m}", "fstp qword ptr {m}", "cmpxchg8b qword ptr {m}",
        "bound eax, qword ptr {m}", "movq mm0, qword ptr {m}", "movdqu xmm0, xmmword ptr {m}",
        # far-pointer loads (also load a segment register from guest data)
        "les eax, fword ptr {m}", "lfs ecx, fword ptr {m}",
    )
    return pre + [r.choice(forms).format(m=m)]


# ------------------------------------------------------------------ sequences
def _install(seq: Sequence, i: int) -> list[str]:
    return [f"mov ebx, {ARGS + 16 * i:#x}", f"mov eax, {SYS_SET_THREAD_AREA}", "int 0x80"]


def _load(seg: str, i: int, r: random.Random) -> list[str]:
    """Load the selector of user_desc #i (the kernel wrote the chosen slot back)."""
    out = [f"mov eax, dword ptr [{ARGS + 16 * i:#x}]", "shl eax, 3", "or eax, 3"]
    if r.random() < 0.03:
        out[-1] = r.choice(("or eax, 7", "or eax, 1"))   # LDT bit / wrong RPL: must fault, not crash the lab
    return out + [f"mov {seg}, ax"]


def generate(seed: int, index: int) -> Sequence:
    r = random.Random(f"tlslab-adversary:{seed}:{index}")
    if r.random() < 0.55:   # what glibc asks for: a flat 4 GiB segment on a TCB (Xen truncates it)
        first = UserDesc(base_addr=_random_base(r) if r.random() < 0.3 else TCB_AREA + r.randrange(0, 0x1800),
                         limit=0xFFFFF, limit_in_pages=True, seg_32bit=True, useable=True,
                         read_exec_only=r.random() < 0.05)
    else:
        first = random_user_desc(r)
    descs = [first]
    two = r.random() < 0.35
    if two:
        same_base = r.random() < 0.4
        second = random_user_desc(r, base=first.base_addr if same_base else None)
        descs.append(second)
    seq = Sequence(index, descs)
    L = seq.lines
    for i in range(len(descs)):
        L += _install(seq, i)
    L += _load("gs", 0, r)
    fs_desc = None
    fs_used = two
    if two:
        L += _load("fs", 1, r)
        fs_desc = descs[1]
    elif r.random() < 0.05:
        L += ["xor eax, eax", "mov fs, ax"]                  # null %fs: any access must fault
        fs_used = True
    # rarely put a TLS selector into ds/es/ss: implicit accesses then go through a TLS segment
    others = []
    for seg in ("es", "ss", "ds"):
        if r.random() < 0.05:
            i = r.randrange(len(descs))
            L += _load(seg, i, r)
            others.append(seg)
            if seg == "ss":
                L.append(f"mov esp, {_h(r.choice((ESP0, r.getrandbits(32), (r.choice(HV_STARTS) - descs[i].base_addr + 0x10) & 0xFFFFFFFF)))}")
    for reg in REGS:
        L.append(f"mov {reg}, {_h(r.choice((r.getrandbits(32), r.randrange(0, 0x100), 0xFFFFFFFC, DATA + 0x100)))}")
    if r.random() < 0.8:   # start where glibc starts: a -ve TLS access or one right at the limit
        L += memory_op(r, "gs", random_offset(r, first) if r.random() < 0.3 else (-r.choice((4, 0x20, 0x24, 0x1000))) & U32)
    for _ in range(r.randint(3, 8)):
        k = r.random()
        if k < 0.62:
            L += memory_op(r, "gs", random_offset(r, first))
        elif k < 0.74:
            L += memory_op(r, "fs" if fs_used else "gs", random_offset(r, fs_desc or first))
        elif k < 0.84:
            L += memory_op(r, r.choice(("", "ds")), ds_target(r))
        elif k < 0.88:
            L += memory_op(r, "ss", ds_target(r))
        elif k < 0.92:
            # unsafe emulation targets: -ve looking offsets whose linear address is in the hole
            hv = r.choice(HV_STARTS)
            L += memory_op(r, "gs", (hv + r.randrange(0, 0x10000) - first.base_addr) & 0xFFFFFFFF)
        elif k < 0.96:
            L += ["mov eax, 0x33", "mov gs, ax"] if r.random() < 0.5 else _load("gs", r.randrange(len(descs)), r)
        else:
            # re-install a descriptor mid-sequence (the loaded selector is refreshed)
            i = r.randrange(len(descs))
            L += _install(seq, i)
    L += ["mov eax, 1", "xor ebx, ebx", "int 0x80"]
    return finish(seq)


# ------------------------------------------------------------------ named regression cases
def _named(index: int, name: str, descs: list[UserDesc], body: list[str]) -> Sequence:
    seq = Sequence(index, descs, name=name)
    for i in range(len(descs)):
        seq.lines += _install(seq, i)
    seq.lines += [f"mov eax, dword ptr [{ARGS:#x}]", "shl eax, 3", "or eax, 3", "mov gs, ax"]
    seq.lines += body + ["mov eax, 1", "xor ebx, ebx", "int 0x80"]
    return finish(seq)


def regression_cases() -> list[Sequence]:
    tcb = TCB_AREA + 0x840
    flat = dict(limit=0xFFFFF, limit_in_pages=True, seg_32bit=True)
    cases = [
        _named(-1, "expand-down, limit 0", [UserDesc(base_addr=tcb, limit=0, contents=1, seg_32bit=True)],
               ["mov eax, dword ptr gs:[0]", "mov eax, dword ptr gs:[0xfffffffc]", "mov eax, dword ptr gs:[0xfffffffd]",
                "mov dword ptr gs:[0xffffffff], eax"]),
        _named(-2, "base in the hole (nonpae)", [UserDesc(base_addr=0xFC001000, **flat)],
               ["mov eax, dword ptr gs:[0]", "mov eax, dword ptr gs:[0x4]", "mov dword ptr gs:[0xfffffffc], eax"]),
        _named(-3, "base in the hole (pae only)", [UserDesc(base_addr=0xF6000000, **flat)],
               ["mov eax, dword ptr gs:[0]", "mov eax, dword ptr gs:[-4]"]),
        _named(-4, "flip at offset 0xffffffff size 4", [UserDesc(base_addr=tcb, **flat)],
               ["mov eax, dword ptr gs:[0xffffffff]", "mov eax, dword ptr gs:[0xfffffffe]",
                "mov ebx, 0xffffffff", "mov eax, dword ptr gs:[ebx]", "mov eax, dword ptr gs:[0xfffffffc]"]),
        _named(-5, "push dword ptr gs:[...] whose target is in the hole", [UserDesc(base_addr=tcb, **flat)],
               [f"push dword ptr gs:[{(0xFC000000 - tcb) & 0xFFFFFFFF:#x}]",
                f"push dword ptr gs:[{(0xFFFFF000 - tcb) & 0xFFFFFFFF:#x}]",
                f"mov eax, dword ptr gs:[{(0xFBFFFFFE - tcb) & 0xFFFFFFFF:#x}]",
                f"pop dword ptr gs:[{(0xF5800000 - tcb) & 0xFFFFFFFF:#x}]"]),
        _named(-6, "ds access to 0xFFFFF000", [UserDesc(base_addr=tcb, **flat)],
               ["mov eax, dword ptr [0xfffff000]", "mov dword ptr ds:[0xfffff000], eax", "mov eax, dword ptr [0xfc000000]",
                "mov eax, 0xfffffffe", "mov eax, dword ptr [eax]"]),
        _named(-7, "descriptor with base 0xFC000000", [UserDesc(base_addr=0xFC000000, **flat)],
               ["mov eax, dword ptr gs:[0]", "mov eax, dword ptr gs:[0xfffffffc]", "inc dword ptr gs:[0x100]"]),
        _named(-8, "base 0xFBFFF000: last page below the hole", [UserDesc(base_addr=0xFBFFF000, **flat)],
               ["mov eax, dword ptr gs:[0xffc]", "mov eax, dword ptr gs:[0xffd]", "mov eax, dword ptr gs:[0x1000]",
                "mov eax, dword ptr gs:[-4]"]),
        _named(-9, "expand-down 16-bit (upper bound 0xffff)",
               [UserDesc(base_addr=0xFBFF8000, limit=0x10, contents=1, seg_32bit=True, limit_in_pages=False)],
               ["mov eax, dword ptr gs:[0xfffc]", "mov eax, dword ptr gs:[0x10000]", "mov eax, dword ptr gs:[0x7ffc]"]),
        # %es holds a TLS selector; the %gs-prefixed stos/push makes an *implicit* es/ss access
        _named(-10, "gs-prefixed stos with es = TLS slot 7 (offset beyond es limit, real linear in the hole)",
               [UserDesc(base_addr=0, entry_number=6, **flat), UserDesc(base_addr=0x10000000, entry_number=7, **flat)],
               ["mov eax, 0x3b", "mov es, ax", "mov edi, 0xefff0000", "mov eax, 0x41414141", ".raw 65ab"]),
        _named(-11, "gs-prefixed push with ss = TLS slot 7 (stack write at a hole address)",
               [UserDesc(base_addr=0, entry_number=6, **flat), UserDesc(base_addr=0x10000000, entry_number=7, **flat)],
               ["mov eax, 0x3b", "mov ss, ax", "mov esp, 0xefff0004", f"push dword ptr gs:[{DATA:#x}]"]),
    ]
    return cases
