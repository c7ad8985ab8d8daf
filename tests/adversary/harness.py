"""Run adversarial sequences on a real Domain and judge every access with an independent oracle.

One ``Lab`` = one Domain (one VCpu, one real ``tlslab.linux`` Process with no
ELF loaded) for one (strategy, profile). Every sequence gets its own code slot
(no guest code is ever reused, so no translated-code or site cache can go
stale), a fresh strategy instance (each sequence is a fresh guest process as
far as the strategy knows) and fresh TLS state; the exits are driven exactly
like ``Domain.run``: syscall -> the Linux personality (set_thread_area through
``tlslab.linux.syscalls_proc``), segment violation -> ``strategy.handle``,
anything else -> a guest fault that ends the sequence.

The oracle does not use tlslab's decoder, fast path or strategies:

1. A Python ``UC_HOOK_MEM_READ|WRITE`` hook over all of memory records every
   access the CPU attempts, with the segment register capstone says it uses
   (explicit operand segment or its default; implicit ss for push/pop/call,
   es for string destinations) and that register's selector at that moment.
   The guest's real linear address is the Unicorn address minus the window
   shift of the selector's TLS slot (``layout.SLOT_WINDOW_SHIFT``), else the
   address itself. An access is *committed* unless the exit that ends that
   ``vcpu.run()`` is a refusal at the same EIP (then the trailing accesses at
   that EIP did not commit).
2. ``GuestAccess.read``/``write`` are wrapped: every access the hypervisor
   performs by emulation is recomputed from the segment register's selector
   and the descriptor in its slot.
3. ``sdm_allows`` (below: the SDM's segment rule re-derived from the raw
   descriptor bits, not tlslab's ``check_data_access``) on the descriptor
   installed at that moment decides whether an access must be refused, and
   the hypervisor hole is the Xen constant of the profile (``HOLE_START``),
   not tlslab's policy object.
4. An access that is refused and *must be fatal* (the guest's own descriptor
   refuses it, or it would land outside guest user space or in the hole, or
   it is not a TLS access at all) must end the sequence with the guest
   killed: a strategy that resumes past it (skips the instruction) is caught
   as ``unsafe_survived``.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace

import capstone
from capstone import x86_const as CX
from unicorn import (UC_HOOK_MEM_READ, UC_HOOK_MEM_READ_UNMAPPED, UC_HOOK_MEM_WRITE, UC_HOOK_MEM_WRITE_UNMAPPED,
                     UC_MEM_WRITE, UC_MEM_WRITE_UNMAPPED)

from adversary import generator as G
from tlslab.hypervisor import access as access_mod
from tlslab.hypervisor.domain import Domain
from tlslab.hypervisor.strategies import STRATEGIES, Action, Trap
from tlslab.linux.pagecache import PageCache
from tlslab.linux.process import Process
from tlslab.linux.syscalls_proc import ProcessExit
from tlslab.machine import layout
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from tlslab.machine.vcpu import ExitReason
from tlslab.x86.descriptor import SegmentDescriptor

U32 = 0xFFFFFFFF
# HYPERVISOR_VIRT_START of Xen 2.0/3.0 x86-32 (xen/include/asm-x86/config.h): 4 GiB - 64 MiB non-PAE,
# 4 GiB - 168 MiB PAE. Written here, not read from tlslab.x86.xen, so that the oracle does not share it.
HOLE_START = {"nonpae": 0xFC00_0000, "pae": 0xF580_0000}
MAX_EXITS = 200
CODE_SLOTS = 0x2000          # distinct code slots before any is reused (8 MiB of code)
MAXF = 0
HV_PAGES = (layout.HYPERVISOR_PAGES, layout.HYPERVISOR_PAGES + layout.HYPERVISOR_PAGES_SIZE)
GDT = (layout.GDT_BASE, layout.GDT_BASE + 8 * layout.GDT_ENTRIES)
STACK_MNEMONICS = {"push", "pop", "call", "pushal", "popal", "pushfd", "popfd", "enter", "leave", "ret"}
STRING_MNEMONICS = ("movs", "cmps", "lods", "stos", "scas")
SEG_NAMES = {CX.X86_REG_CS: "cs", CX.X86_REG_DS: "ds", CX.X86_REG_ES: "es", CX.X86_REG_FS: "fs",
             CX.X86_REG_GS: "gs", CX.X86_REG_SS: "ss"}
FLAT = SegmentDescriptor.flat_user_data(0)

def sdm_allows(desc: SegmentDescriptor, offset: int, size: int, write: bool) -> bool:
    """Intel SDM vol. 3, 3.4.5 and 5.3, from the descriptor's 8 raw bytes (independent of tlslab.x86.segcheck).

    Present, a data segment (or a readable code segment for reads), writable for
    writes; expand-up: the last byte at or below the (G-scaled) limit; expand-down:
    the first byte above the limit and the last at or below 0xFFFF / 0xFFFFFFFF (B).
    One measured exception (tests/test_oracle.py, on the CPU): a flat expand-up
    segment (base 0, limit 4 GiB - 1) lets an access wrap past 4 GiB.
    """
    raw = int.from_bytes(desc.to_bytes(), "little")
    lo, hi = raw & U32, raw >> 32
    limit = (lo & 0xFFFF) | (hi & 0xF_0000)
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF00_0000)
    typ, s, p = (hi >> 8) & 0xF, (hi >> 12) & 1, (hi >> 15) & 1
    big, gran = (hi >> 22) & 1, (hi >> 23) & 1
    if not p or not s:
        return False
    if typ & 8:                      # code: never writable, readable if R
        if write or not typ & 2:
            return False
        down = False
    else:
        if write and not typ & 2:
            return False
        down = bool(typ & 4)
    eff = (limit << 12) | 0xFFF if gran else limit
    last = offset + size - 1
    if down:
        return offset > eff and last <= (U32 if big else 0xFFFF)
    if last <= eff:
        return True
    return base == 0 and eff == U32 and offset <= U32


_CS_LITE = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
SEG_REGS = ("cs", "ds", "es", "fs", "gs", "ss")


# ------------------------------------------------------------------ results
@dataclass
class Stats:
    sequences: int = 0
    accesses: int = 0            # CPU accesses checked by the oracle
    committed: int = 0
    refused: int = 0             # accesses the oracle's check refuses, and the vCPU refused
    refused_as_page_fault: int = 0   # ... reported as a page fault instead of a #GP
    violations: int = 0          # SEGMENT_VIOLATION exits
    reached_handler: int = 0     # sequences with at least one SEGMENT_VIOLATION exit
    traps_handled: int = 0       # strategy resumed/restarted
    emulated: int = 0            # emulated accesses checked
    blind_spot: int = 0          # committed accesses in the documented blind spot (layout.py)
    hv_page_reads: int = 0       # plain reads of the hypervisor pages (GDT), allowed by design
    hole: int = 0                # MUST be 0
    outside_user: int = 0        # committed, above user space, not blind spot / GDT read: MUST be 0
    silent_commit: int = 0       # committed although the segment check refuses it: MUST be 0
    lab_exceptions: int = 0      # MUST be 0
    emu_beyond_request: int = 0  # emulated although the guest's own descriptor refuses it
    emu_wrong_linear: int = 0    # emulator touched another linear address than the guest's
    fatal_refusals: int = 0      # refused accesses that must kill the guest (see the module docstring)
    unsafe_survived: int = 0     # sequences that went on after such an access: MUST be 0
    blind_survived: int = 0      # ... went on only through a blind-spot access after it (documented limitation)
    fatal_livelock: int = 0      # ... of which one access must have killed the guest (its own descriptor refuses it)
    commit_beyond_request: int = 0   # committed through a TLS window although the guest's own descriptor refuses it
    ping_pong: int = 0           # exit cap reached restarting one instruction whose accesses straddle
                                 # offset 0 (no single expand-up/down segment admits both): flip's livelock
    spurious_violation: int = 0  # #GP reported for an access the oracle allows
    null_selector_commits: int = 0
    guest_faults: int = 0
    exits_cap: int = 0
    timeouts: int = 0
    dropped_ops: int = 0
    seconds: float = 0.0
    failures: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def fail(self, kind: str, seq, detail: str, limit: int = 6) -> None:
        limit = max(limit, MAXF)
        self.notes[kind] = self.notes.get(kind, 0) + 1
        if sum(1 for f in self.failures if f[0] == kind) < limit:
            self.failures.append((kind, detail, seq.listing()))

    def merge(self, other: "Stats") -> None:
        for k, v in vars(other).items():
            if isinstance(v, (int, float)):
                setattr(self, k, getattr(self, k) + v)
        self.failures += other.failures
        for k, v in other.notes.items():
            self.notes[k] = self.notes.get(k, 0) + v


@dataclass
class Access:
    eip: int
    write: bool
    addr: int
    size: int
    seg: str
    selector: int
    host: bool


@dataclass
class InsnInfo:
    mnemonic: str
    explicit: list          # [(segment name, base reg name)] of memory operands
    stack: bool
    string: bool
    loads_sreg: bool
    text: str


_MEM_OPERAND = re.compile(r"(?:\b([c-gs]s):)?\[([^\]]*)\]")


_RMW = {"add", "or", "adc", "sbb", "and", "sub", "xor", "inc", "dec", "neg", "not", "xchg", "cmpxchg",
        "cmpxchg8b", "xadd", "shl", "sal", "shr", "sar", "rol", "ror", "rcl", "rcr", "bts", "btr", "btc",
        "shld", "shrd"}


def _is_read_modify_write(info) -> bool:
    """Capstone's view (independent of tlslab's decoder): memory destination of an RMW op."""
    if info is None or info.mnemonic.split()[-1] not in _RMW:
        return False
    ops = info.text[len(info.mnemonic):]
    return "ptr" in ops.split(",")[0]


def insn_info(code: bytes, eip: int) -> InsnInfo | None:
    """Capstone's reading of the instruction (text form: cheap, and it names every segment override)."""
    insn = next(_CS_LITE.disasm_lite(code, eip, 1), None)
    if insn is None:
        return None
    _addr, _size, m, ops = insn
    explicit = []
    for seg, inner in _MEM_OPERAND.findall(ops):
        if not seg:
            base = inner.split(" ")[0]
            seg = "ss" if base in ("ebp", "esp", "bp", "sp") else "ds"
        explicit.append(seg)
    dest = ops.split(",")[0].strip()
    loads_sreg = m in ("lds", "les", "lfs", "lgs", "lss") or (m in ("mov", "pop") and dest in SEG_REGS)
    return InsnInfo(m, explicit, m in STACK_MNEMONICS or m.startswith("push") or m.startswith("pop"),
                    m.startswith(STRING_MNEMONICS) or m.startswith("rep"), loads_sreg, f"{m} {ops}")


_INFO_CACHE: dict = {}


# ------------------------------------------------------------------ the lab
class Lab:
    def __init__(self, strategy: str, profile: str):
        self.strategy_name = strategy
        self.profile = profile

        def factory(vcpu, shape):
            p = Process(vcpu, "/nonexistent/tlslab-adversary", descriptor_policy=shape)
            seg = SimpleNamespace(vaddr=G.CODE, filesz=CODE_SLOTS * G.SLOT, offset=0x1000)
            p.image = SimpleNamespace(segments=[seg], path="", symbolize=lambda a: f"{a:#010x}")
            return p

        self.domain = d = Domain(factory, strategy, profile=profile)
        self.vcpu = v = d.vcpu
        self.process = d.process
        self.hv = HOLE_START[profile]
        mem = v.mem
        mem.map(G.LOW, G.LOW_SIZE, PROT_READ | PROT_WRITE, "low")
        mem.map(G.DATA, G.DATA_SIZE, PROT_READ | PROT_WRITE, "data")
        mem.map(G.STACK_LO, G.STACK_SIZE, PROT_READ | PROT_WRITE, "[stack]")
        mem.map(G.PAD_PAGE, 0x1000 + CODE_SLOTS * G.SLOT, PROT_READ | PROT_EXEC, "code")
        pad = (G.asm("mov eax, 1; xor ebx, ebx; int 0x80") or b"") + b"\xcc"
        mem.write(G.PAD_PAGE, b"\xcc" * 0x1000)
        mem.write(G.EXIT_PAD, pad)
        self.pattern = {G.LOW: (G.EXIT_PAD.to_bytes(4, "little") * (G.LOW_SIZE // 4)),
                        G.DATA: (G.EXIT_PAD.to_bytes(4, "little") * (G.DATA_SIZE // 4)),
                        G.STACK_LO + G.STACK_SIZE - 0x2000: G.EXIT_PAD.to_bytes(4, "little") * (0x2000 // 4)}
        v.enter_user_mode(G.EXIT_PAD, G.ESP0)   # ring 3; every sequence then starts by setting EIP
        # Every sequence starts from this CPU state. Restoring it also clears QEMU's pending-exception
        # memory: after an exception that the vCPU reported (the guest "died"), QEMU never delivered
        # it, so reusing the CPU would turn the next sequence's #NP into #DF and then a triple fault.
        self.context = v.uc.context_save()
        self.next_slot = 0
        self.sites_used = 0
        self.log: list[Access] = []
        self.emulated: list[tuple] = []
        self.info: dict[int, InsnInfo | None] = {}
        self.in_handler = False
        v.uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._on_access)
        v.uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED, self._on_unmapped)
        self._regs = v.regs
        self._fast_header = v._fast.header if v._fast is not None else None

    # -------------------------------------------------------------- hooks
    def _info(self, eip: int) -> InsnInfo | None:
        mem = self.vcpu.mem
        try:
            code = mem.read(eip, 15) if mem.is_mapped(eip, 15) else bytes(self.vcpu.uc.mem_read(eip, 15))
        except Exception:
            return None
        key = (eip, code)
        info = _INFO_CACHE.get(key, False)
        if info is False:
            if len(_INFO_CACHE) > 200_000:
                _INFO_CACHE.clear()
            info = _INFO_CACHE[key] = insn_info(code, eip)
        self.info[eip] = info
        return info

    def _on_unmapped(self, uc, access, address, size, value, user_data) -> bool:
        self._on_access(uc, UC_MEM_WRITE if access == UC_MEM_WRITE_UNMAPPED else 0, address, size, value, user_data)
        return False

    def _on_access(self, uc, access, address, size, value, user_data) -> None:
        regs = self._regs
        host = bool(self._fast_header is not None and self._fast_header.host_access) or self.in_handler
        eip = regs.get("eip")
        write = access == UC_MEM_WRITE
        seg = "ds"
        info = None if host else self._info(eip)
        if info is not None:
            seg = info.explicit[-1] if info.explicit else "ds"
            if info.stack:
                esp = regs.get("esp")
                ss_base = self._ubase(regs.get("ss") & 0xFFFF)
                if (write and address == (ss_base + esp - size) & U32) or (not write and address == (ss_base + esp) & U32):
                    seg = "ss"
            elif info.string and "es" in info.explicit:
                edi = regs.get("edi")
                es_base = self._ubase(regs.get("es") & 0xFFFF)
                other = [s for s in info.explicit if s != "es"] or ["es"]
                seg = "es" if address == (es_base + edi) & U32 else other[0]
        selector = regs.get(seg) & 0xFFFF
        self.log.append(Access(eip, write, address, size, seg, selector, host))

    def _ubase(self, selector: int) -> int:
        """The base Unicorn uses for ``selector`` (window-shifted for TLS slots)."""
        slot = selector >> 3
        if selector & 4 or slot not in layout.SLOT_WINDOW_SHIFT:
            return 0
        d = self.vcpu.descriptors[slot]
        return 0 if d is None else (d.base + layout.SLOT_WINDOW_SHIFT[slot]) & U32

    # -------------------------------------------------------------- one sequence
    def reset(self, seq) -> int:
        v, p, d = self.vcpu, self.process, self.domain
        regs = v.regs
        v.uc.context_restore(self.context)   # ring 3, fs = gs = 0, ds = es = ss = USER_DS
        for slot in range(layout.GDT_ENTRY_TLS_MIN, layout.GDT_ENTRY_TLS_MIN + layout.GDT_ENTRY_TLS_ENTRIES):
            if v.descriptors[slot] is not None:
                v.set_descriptor(slot, None)
        p.tls_requested.clear()
        p.tls_events.clear()
        p.tls_hooks = []
        p.page_cache = PageCache()
        d._requested.clear()
        d.strategy = STRATEGIES[self.strategy_name]()
        d.strategy.attach(d)
        for start, data in self.pattern.items():
            v.mem.write(start, data)
        for i, ud in enumerate(seq.descs):
            v.mem.write(G.ARGS + 16 * i, ud.pack())
        if self.sites_used > 20_000:     # the fast path's site table holds 32768 instructions
            v._fast.reset_sites()
            v._site_usage.clear()
            self.sites_used = 0
        if self.next_slot == CODE_SLOTS:   # all slots used: start over, dropping every cache of old code
            self.next_slot = 0
            v.invalidate_code(G.CODE, CODE_SLOTS * G.SLOT)
            v._fast.reset_sites()
            v._site_usage.clear()
            self.sites_used = 0
        eip = G.CODE + self.next_slot * G.SLOT
        self.next_slot += 1
        v.mem.write(eip, seq.code + b"\xcc" * (G.SLOT - len(seq.code)))
        self.sites_used += seq.code.count(b"\x65") + seq.code.count(b"\x64") + 8
        regs.set("eip", eip)
        regs.set("esp", G.ESP0)
        regs.set("eflags", 0x202)
        return eip

    def run_sequence(self, seq, st: Stats) -> None:
        st.sequences += 1
        st.dropped_ops += seq.dropped
        self.info.clear()
        self.log.clear()
        try:
            self._run(seq, st)
        except Exception:
            st.lab_exceptions += 1
            st.fail("lab-exception", seq, traceback.format_exc(limit=8))

    def _run(self, seq, st: Stats) -> None:
        d, v = self.domain, self.vcpu
        self.reset(seq)
        reached = False
        fatal: list[str] = []      # refused accesses after which the guest must die
        vio_sites: list[tuple[int, bool]] = []   # (eip, negative offset) of every violation

        blind_before = [0]

        def survived(how: str) -> None:
            if fatal and st.blind_spot > blind_before[0]:
                # the documented blind spot (layout.py) let a later access through unseen, e.g. rewrite's
                # %fs twin (slot 7) reaching [1 GiB, 2 GiB): a known limitation, counted apart
                st.blind_survived += 1
                st.fail("blind-spot-survived", seq, f"{how}; blind-spot access after: {fatal[0]}", limit=3)
            elif fatal:
                st.unsafe_survived += 1
                st.fail("unsafe-access-survived", seq, f"{how} after a refused access that must be fatal: {fatal[0]}")

        for _ in range(MAX_EXITS):
            self.log.clear()
            self.emulated.clear()
            self.info.clear()   # strategies may have patched code
            descriptors = list(v.descriptors)
            e = v.run()
            refusal = e.reason in (ExitReason.SEGMENT_VIOLATION, ExitReason.PAGE_FAULT, ExitReason.EXCEPTION)
            why = self._judge(seq, st, e, descriptors, refusal)
            if why:
                st.fatal_refusals += 1
                if not fatal:
                    blind_before[0] = st.blind_spot
                fatal.append(why)
            if e.reason is ExitReason.SYSCALL:
                try:
                    self.in_handler = True
                    d.process.handle_syscall()
                except ProcessExit as done:
                    if not done.signal:
                        survived(f"the guest exited normally (status {done.status})")
                    return
                finally:
                    self.in_handler = False
                continue
            if e.reason is ExitReason.SEGMENT_VIOLATION:
                st.violations += 1
                vio_sites.append((e.eip, e.violation.offset >= 0x8000_0000))
                if not reached:
                    reached = True
                    st.reached_handler += 1
                self.in_handler = True
                try:
                    verdict = d.strategy.handle(Trap(e.violation, d))
                finally:
                    self.in_handler = False
                self._judge_emulated(seq, st)
                if verdict.action is Action.KILL:
                    st.guest_faults += 1
                    return
                st.traps_handled += 1
                continue
            if e.reason is ExitReason.TIMEOUT:
                st.timeouts += 1
                st.fail("timeout", seq, f"{e}", limit=3)
                survived("timed out")
                return
            st.guest_faults += 1
            return
        last = vio_sites[-20:]
        if len(last) == 20 and len({eip for eip, _ in last}) == 1 and len({neg for _, neg in last}) == 2:
            # one instruction, refused alternately at negative and positive offsets, restarted forever:
            # nothing of it commits and nothing after it runs, but the guest hangs instead of dying
            st.ping_pong += 1
            if fatal:
                st.fatal_livelock += 1
            st.fail("ping-pong", seq, f"{MAX_EXITS} exits restarting eip {last[0][0]:#x}"
                    + (f"; one access must be fatal: {fatal[0]}" if fatal else ""), limit=3)
            return
        survived(f"ran on for {MAX_EXITS} exits")
        st.exits_cap += 1
        st.fail("exit-cap", seq, f"more than {MAX_EXITS} exits (trap ping-pong?)", limit=3)

    # -------------------------------------------------------------- the oracle
    def _judge(self, seq, st: Stats, e, descriptors, refusal: bool) -> None:
        log = self.log
        n = len(log)
        uncommitted_from = n
        if refusal:
            while uncommitted_from > 0 and log[uncommitted_from - 1].eip == e.eip and not log[uncommitted_from - 1].host:
                uncommitted_from -= 1
        for i, a in enumerate(log):
            if a.host:
                continue
            info = self.info.get(a.eip)
            if info is not None and info.loads_sreg and GDT[0] <= a.addr < GDT[1] and not a.write:
                continue   # the CPU reading a descriptor during a segment load
            st.accesses += 1
            committed = i < uncommitted_from
            sel = a.selector
            slot = sel >> 3
            desc = None
            windowed = not sel & 4 and slot in layout.SLOT_WINDOW_SHIFT and descriptors[slot] is not None
            if windowed:
                desc = descriptors[slot]
                shift = layout.SLOT_WINDOW_SHIFT[slot]
                real = (a.addr - shift) & U32
                offset = (real - desc.base) & U32
                allowed = sdm_allows(desc, offset, a.size, a.write)
            else:
                real = a.addr
                offset = a.addr
                null = sel < 4 and a.seg in ("fs", "gs")
                allowed = not null
            last = real + a.size - 1
            where = (f"{a.seg}={sel:#x} eip={a.eip:#x} `{info.text if info else '?'}` "
                     f"{'write' if a.write else 'read'} size {a.size} unicorn {a.addr:#x} real linear {real:#x}"
                     f" offset {offset:#x} desc {desc} exit {e.reason.value}@{e.eip:#x} {e.message}")
            if not committed:
                if not allowed:
                    st.refused += 1
                    if e.reason is ExitReason.PAGE_FAULT:
                        st.refused_as_page_fault += 1
                continue
            st.committed += 1
            if last >= self.hv or last > U32:
                st.hole += 1
                st.fail("HOLE", seq, where)
            elif last >= layout.USER_TOP:
                if not a.write and HV_PAGES[0] <= real and last < HV_PAGES[1] and not windowed:
                    st.hv_page_reads += 1
                elif windowed and a.addr < layout.USER_TOP:
                    st.blind_spot += 1
                else:
                    st.outside_user += 1
                    st.fail("outside-user-space", seq, where)
            in_blind_spot = windowed and a.addr < layout.USER_TOP and real >= layout.USER_TOP
            if windowed and not in_blind_spot and self.process.tls_requested.get(slot) is not None \
                    and not sdm_allows(self.process.tls_requested[slot], offset, a.size, a.write):
                st.commit_beyond_request += 1
                st.fail("commit-beyond-request", seq, where, limit=3)
            if not allowed:
                if windowed and a.addr < layout.USER_TOP and real >= layout.USER_TOP:
                    st.blind_spot += 0   # counted above: the documented blind spot
                elif not windowed:
                    st.null_selector_commits += 1
                    st.fail("null-selector-commit", seq, where, limit=3)
                else:
                    st.silent_commit += 1
                    st.fail("silent-commit", seq, where)
        fatal = None
        if e.reason is ExitReason.SEGMENT_VIOLATION:   # page faults and exceptions end the sequence anyway
            for a in log[uncommitted_from:]:
                if not a.host and fatal is None:
                    fatal = self._must_be_fatal(a, descriptors)
        if e.reason is ExitReason.SEGMENT_VIOLATION:
            tail = [a for a in log[uncommitted_from:] if not a.host]
            vio = e.violation
            ok = False
            for a in tail:
                slot = a.selector >> 3
                if not a.selector & 4 and slot in layout.SLOT_WINDOW_SHIFT and descriptors[slot] is not None:
                    desc = descriptors[slot]
                    off = (a.addr - layout.SLOT_WINDOW_SHIFT[slot] - desc.base) & U32
                    if not sdm_allows(desc, off, a.size, a.write):
                        ok = True
                    # SDM: a read-modify-write whose destination is not writable faults
                    # (#GP) before anything happens -- the lab reports it at the read
                    elif vio.write and not a.write and _is_read_modify_write(self.info.get(a.eip)) \
                            and not sdm_allows(desc, off, a.size, True):
                        ok = True
            if not ok:
                st.spurious_violation += 1
                st.fail("spurious-violation", seq, f"{vio} tail={tail}", limit=3)
        return fatal

    def _must_be_fatal(self, a: Access, descriptors) -> str | None:
        """Why refused access ``a`` must kill the guest, or None if a strategy may resume it."""
        slot = a.selector >> 3
        if a.selector & 4 or slot not in layout.SLOT_WINDOW_SHIFT or descriptors[slot] is None:
            # not through a TLS window: fatal if it is refused at all (nothing may handle it)
            where = f"{a.seg}={a.selector:#x} {a.addr:#x} (eip {a.eip:#x})"
            if a.seg in ("fs", "gs") and a.selector < 4:
                return f"null selector: {where}"
            if a.addr + a.size - 1 >= layout.USER_TOP:
                return f"outside guest user space: {where}"
            r = self.vcpu.mem.region_at(a.addr)
            if r is None or not (r.prot & (PROT_WRITE if a.write else PROT_READ | PROT_EXEC)):
                return f"page fault: {where}"
            return None
        rmw = _is_read_modify_write(self.info.get(a.eip))
        installed = descriptors[slot]
        inst_off = (a.addr - layout.SLOT_WINDOW_SHIFT[slot] - installed.base) & U32
        if all(sdm_allows(installed, inst_off, a.size, w) for w in {a.write, a.write or rmw}):
            return None          # not what was refused
        requested = self.process.tls_requested.get(slot)
        if requested is None:
            return None          # a strategy's own descriptor (the %fs twin of rewrite, flip-fs): judged as above
        real = (a.addr - layout.SLOT_WINDOW_SHIFT[slot]) & U32
        offset = (real - descriptors[slot].base) & U32
        for write in {a.write, a.write or rmw}:
            if not sdm_allows(requested, offset, a.size, write):
                return f"the guest's own {a.seg} descriptor refuses {a.seg}:{offset:#x} (eip {a.eip:#x})"
        linear = (requested.base + offset) & U32
        last = linear + a.size - 1
        if last > U32 or last >= self.hv:
            return f"{a.seg}:{offset:#x} reaches the hypervisor hole at {linear:#x} (eip {a.eip:#x})"
        if last >= layout.USER_TOP:
            return f"{a.seg}:{offset:#x} is outside guest user space at {linear:#x} (eip {a.eip:#x})"
        return None

    def _judge_emulated(self, seq, st: Stats) -> None:
        for segment, offset, size, write, lab_linear, selector in self.emulated:
            st.emulated += 1
            slot = selector >> 3
            base = 0
            requested = None
            if not selector & 4 and slot in layout.SLOT_WINDOW_SHIFT and self.vcpu.descriptors[slot] is not None:
                base = self.vcpu.descriptors[slot].base
                requested = self.process.tls_requested.get(slot)
            real = (base + offset) & U32
            last = real + size - 1
            where = (f"emulated {segment}={selector:#x}:{offset:#x} size {size} {'write' if write else 'read'}: "
                     f"real linear {real:#x}, emulator used {lab_linear:#x}, requested {requested}")
            if last >= self.hv or last > U32 or lab_linear + size - 1 >= self.hv:
                st.hole += 1
                st.fail("HOLE (emulated)", seq, where)
            elif last >= layout.USER_TOP or lab_linear + size - 1 >= layout.USER_TOP:
                st.outside_user += 1
                st.fail("outside-user-space (emulated)", seq, where)
            if real != lab_linear:
                st.emu_wrong_linear += 1
                st.fail("emulated-wrong-linear", seq, where, limit=3)
            if requested is not None and not sdm_allows(requested, offset, size, write):
                st.emu_beyond_request += 1
                st.fail("emulated-beyond-request", seq, where, limit=3)


# ------------------------------------------------------------------ emulated-access oracle
_LABS: list[Lab] = []


def install_emulation_oracle(monkeypatch=None) -> None:
    """Wrap GuestAccess.read/write so every emulated access is reported to the running Lab."""
    orig_read, orig_write = access_mod.GuestAccess.read, access_mod.GuestAccess.write

    def record(self, segment, offset, size, write):
        lab_linear = self.linear(segment, offset, size, write)   # raises AccessRefused like the original
        for lab in _LABS:
            if lab.domain is self.domain:
                selector = lab.vcpu.regs.get(segment) & 0xFFFF
                lab.emulated.append((segment, offset, size, write, lab_linear, selector))

    def read(self, segment, offset, size):
        value = orig_read(self, segment, offset, size)
        record(self, segment, offset, size, False)
        return value

    def write(self, segment, offset, size, value):
        orig_write(self, segment, offset, size, value)
        record(self, segment, offset, size, True)

    if monkeypatch is not None:
        monkeypatch.setattr(access_mod.GuestAccess, "read", read)
        monkeypatch.setattr(access_mod.GuestAccess, "write", write)
    else:
        access_mod.GuestAccess.read = read
        access_mod.GuestAccess.write = write


def run_many(strategy: str, profile: str, sequences, stats: Stats | None = None) -> Stats:
    st = stats or Stats()
    t = time.perf_counter()
    lab = Lab(strategy, profile)
    _LABS.append(lab)
    try:
        for seq in sequences:
            lab.run_sequence(seq, st)
    finally:
        _LABS.remove(lab)
    st.seconds += time.perf_counter() - t
    return st
