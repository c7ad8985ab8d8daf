"""rewrite-2004: Xen's flip plus XenLinux's out-of-line binary rewriting (fixup.c).

What ran in 2004 (docs/background.md#fixup-c; our own code after reading Xen's
seg_fixup.c and XenLinux's arch/xen/i386/kernel/fixup.c):

1. Xen's #GP handler (seg_fixup) flips %gs (expand-up <-> expand-down), then,
   because the guest kernel enabled VMASST_TYPE_4gb_segments_notify, bounces
   vector 15 to the guest kernel (``notifications``), error code = the length
   of the instruction through its displacement.
2. The guest kernel's handler (do_fixup_4gb_segment) patches the faulting
   instruction when it can: GS override as first byte, opcode 80-83/89/8B/C7,
   ModRM ``(reg)`` or ``disp8(reg)`` (``coverage.fixup_2004_handles``). It
   writes, into a 2-page buffer mapped read+exec at user address 0x1000, a
   stub: a 4-byte pointer to the stub code, then ``push reg`` (unless the
   instruction is ``mov (reg),reg``), ``pushf``, ``add %gs:0,reg`` (+ve:
   never faults on an expand-up %gs), ``popf``, the instruction without its
   GS prefix (now a flat access at reg = TCB + offset), ``pop reg``, the
   following instructions relocated until 5 bytes are covered, ``ret``. The
   site gets ``67 ff 16 <disp16>`` -- ``call *(disp16)`` through the pointer,
   5 bytes, which is why the buffer sits below 64 KiB -- and NOPs over the
   rest of the covered bytes. Because the stub is entered by ``call`` and
   left by ``ret``, a relocated short ``jcc``/``jmp`` (or ``jmp rel32``)
   becomes ``jcc +1; ret; pushf; add $off,4(%esp); popf; ret``: the return
   address is moved to the branch target -- stubs are position-independent,
   so identical code sequences share one stub (de-duplicated by the covered
   code bytes; XenLinux: a 128-bucket XOR hash plus memcmp).
3. "Out of room": once the buffer has fewer than 64 free bytes no new stub is
   made; the faults there are still fixed by Xen's flip (as in 2004: the
   flip already happened before the notification), so the guest runs, just
   slower. A site fixup.c cannot handle is likewise only flipped.

Our execution model: after patching, the faulting instruction is restarted
at its (now patched) address, so the stub performs it. XenLinux instead
resumed *after* it inside the stub, the flip having let the instruction run
(its EIP arithmetic ``regs->eip - error_code``); the effect is the same.
Because Xen flipped first, the stub's ``add %gs:0`` meets an expand-down %gs
once after each -ve patch and flips it back: about two traps per patched site.

Deliberate deviations from fixup.c, each counted in ``by_kind``:
* the copied instruction uses its true length; fixup.c used the
  notification's error code, which omits an immediate (``65 83 /0 ib``,
  ``65 c7 /0 id``) -- those sites are counted as ``2004-length-bug`` (fixup.c
  would have relocated a truncated instruction);
* instructions fixup.c handled with stack tricks (push/pop in the relocated
  tail, ``ret`` inside it) and anything touching %esp other than an
  ``(%esp)``-based operand (adjusted by +4 for the return address) are not
  patched; nor is ``mov %reg,%gs:(%reg)`` or a %esp data register (the stub
  would store the wrong value);
* the relocated tail is decoded with fixup.c's length table *and* our decoder;
  where they disagree the site is not patched (fixup.c would have mis-relocated).

Processes: the buffer is one set of pages that every address space maps. In
fixup.c with the 0x1000 buffer (xen-project/xen history,
``linux-2.6.7-xen-sparse``, from 2004-08-10, 81e8a9dce6, until 08-17,
4194afb396; the shared call/ret stubs modelled here from 08-11, 8892b94a8d)
the kernel mapped it once into its master page directory and reserved the
first 4 MiB of every process (``FIRST_USER_PGD_NR 1``; ``pgd_ctor`` copies that
entry into each new page directory; user mmaps there were refused), so a
forked child and a freshly exec'd program had it, with every stub, from their
first instruction, and patched page-cache pages of /lib/tls could call into
it from any process. tlslab maps the buffer into each new address space (fork
copies it; exec gets its current contents), writes each new stub into every
live one, and reserves it (``Process.reserved``: mmap, munmap, mprotect and
mremap over it fail with EINVAL). A program whose own image maps those pages
is refused at its first fault. (4194afb396 mapped the buffer per process at
the first notification instead, which left a freshly exec'd process running
patched code without it, and shipped disabled; the rewriting was removed on
08-18, 37dca5a201.)

Patch policy (``patch_policy``, as for ``rewrite``): ``auto`` (default) --
``lib`` for a dynamic program: only code of libraries the loader mapped from
under /lib with no writable shared mapping, fixup.c's own rule on real files;
``exe`` for a static one, its analogue (the executable's file-backed code);
``all`` -- any executable mapping, including the
fixup buffer itself (fixup.c: "always safe to patch the fixup buffer");
``none`` -- flip + notification only. ``page_sharing``: ``shared`` (default,
fixup.c wrote through a kernel mapping of the page-cache page) or ``private``.
Static application of a rewrite-2004 patch set is refused (the buffer is not
in the ELF file): see :mod:`tlslab.hypervisor.patches`.
"""

from __future__ import annotations

from tlslab.hypervisor import patches as P
from tlslab.hypervisor.strategies.base import Action, Trap, Verdict
from tlslab.hypervisor.strategies.flip import FlipStrategy
from tlslab.hypervisor.strategies.rewrite import PatchesCode, PatchOptions, patch_allowed
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from tlslab.x86 import coverage
from tlslab.x86.decode import DecodeError, decode

FIXUP_BUF_USER = 0x1000
FIXUP_BUF_SIZE = 0x2000
FIXUP_RESERVE = 64          # fixup.c: no new stub once fewer than 64 bytes are free
PATCH_LEN = 5
MAX_PATCHED = 20            # fixup.c: "Code to patch is too long!"
_REG32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_STACK_MNEMONICS = {"push", "pop", "call", "ret", "retf", "leave", "enter", "pushal", "popal", "pushfd",
                    "popfd", "pushaw", "popaw", "pushf", "popf", "iretd", "int", "into", "int3"}
_SHORT_JUMPS = set(range(0x70, 0x80)) | {0xEB}


class CannotPatch(Exception):
    """Why fixup.c (or our safer version of it) leaves a site alone."""


def _esp_adjusted(insn, extra: int) -> bytes:
    """``insn`` re-encoded with ``extra`` added to the displacement of its (%esp)-based operand."""
    raw = bytearray(insn.raw)
    pos = insn.prefixes.count + len(insn.opcode_bytes)  # ModRM
    mod = raw[pos] >> 6
    if insn.sib is None:
        raise CannotPatch("esp-based operand without SIB")
    disp_at = pos + 2
    if mod == 0:
        raw[pos] |= 0x40
        raw[disp_at:disp_at] = bytes([extra])
    elif mod == 1:
        d = int.from_bytes(raw[disp_at:disp_at + 1], "little", signed=True) + extra
        if d > 127:
            raise CannotPatch("esp displacement overflows disp8")
        raw[disp_at] = d & 0xFF
    else:
        d = int.from_bytes(raw[disp_at:disp_at + 4], "little", signed=True) + extra
        raw[disp_at:disp_at + 4] = (d & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(raw)


def _adjust_return(off: int) -> bytes:
    """``pushf; add $off,4(%esp); popf; ret``: continue at return address + off."""
    if -128 <= off <= 127:
        add = bytes([0x83, 0x44, 0x24, 0x04, off & 0xFF])
    else:
        add = bytes([0x81, 0x44, 0x24, 0x04]) + (off & 0xFFFFFFFF).to_bytes(4, "little")
    return b"\x9c" + add + b"\x9d\xc3"


def build_stub(eip: int, code: bytes, insn) -> tuple[bytes, int, list[str]]:
    """Stub code (without the 4-byte pointer) for the faulting ``insn`` at ``eip``.

    Returns (code, bytes covered at the site, notes). Raises CannotPatch.
    """
    raw = insn.raw
    opcode, modrm = raw[1], raw[2]
    reg, rm = (modrm >> 3) & 7, modrm & 7
    if opcode in (0x89, 0x8B) and reg == 4:
        raise CannotPatch("%esp as the data register")
    if opcode == 0x89 and reg == rm:
        raise CannotPatch("stores the base register itself (mov %reg,%gs:(%reg))")
    save = not (opcode == 0x8B and reg == rm)
    out = bytearray()
    if save:
        out.append(0x50 + rm)                                  # push reg
    out.append(0x9C)                                           # pushf
    out += bytes([0x65, 0x03, 0x05 | (rm << 3)]) + bytes(4)   # add %gs:0,reg
    out.append(0x9D)                                           # popf
    out += raw[1:]                                             # the instruction, no GS prefix
    if save:
        out.append(0x58 + rm)                                  # pop reg
    notes = []
    covered = insn.length
    while covered < PATCH_LEN:
        tail = code[covered:]
        table_len = coverage.fixup_2004_following_length(tail)
        nxt = decode(tail, eip + covered)
        if table_len is None or isinstance(nxt, DecodeError):
            raise CannotPatch("could not decode following instruction")
        if table_len != nxt.length:
            raise CannotPatch(f"fixup.c's length table says {table_len} for `{nxt.mnemonic}`, it is {nxt.length}")
        first = nxt.raw[nxt.prefixes.count]
        end = covered + nxt.length
        if first in _SHORT_JUMPS or first == 0xE9:
            if end < PATCH_LEN:
                raise CannotPatch("jump before 5 bytes are covered")
            rel = nxt.immediate
            off = (end - PATCH_LEN) + rel
            if first == 0xEB or first == 0xE9:
                out += _adjust_return(off)
            else:
                out += bytes([first, 0x01, 0xC3]) + _adjust_return(off)   # jcc over `ret`
            notes.append(f"relocated `{nxt.mnemonic}`")
            return bytes(out), end, notes
        if nxt.branch_target is not None or nxt.mnemonic in _STACK_MNEMONICS:
            raise CannotPatch(f"`{nxt.mnemonic}` in the relocated tail")
        if "esp" in (nxt.reg, nxt.rm_reg) or "sp" in (nxt.reg, nxt.rm_reg):
            raise CannotPatch(f"`{nxt.mnemonic}` uses %esp")
        m = nxt.memory
        if m is not None and m.index == "esp":
            raise CannotPatch("esp index")
        if m is not None and m.base == "esp":
            out += _esp_adjusted(nxt, 4)                      # the call pushed a return address
            notes.append("esp-relative operand adjusted by +4")
        else:
            out += nxt.raw
        covered = end
        if covered > MAX_PATCHED:
            raise CannotPatch("code to patch is too long")
    out.append(0xC3)                                           # ret (to site + 5: NOPs, then site + covered)
    return bytes(out), covered, notes


class Rewrite2004Strategy(PatchesCode, FlipStrategy):
    """Xen's side is exactly ``flip`` (seg_fixup coverage, %gs only); on top, the notification and patching."""

    name = "rewrite-2004"
    order = 31
    description = ("XenLinux 2004 fixup.c: Xen flips %gs and notifies (vector 15); the guest kernel patches "
                   "the site with a call into an out-of-line stub at 0x1000")

    Options = PatchOptions

    def __init__(self, options: PatchOptions | None = None) -> None:
        super().__init__(options)
        self.buffer_size = FIXUP_BUF_SIZE
        self.patch_set: P.PatchSet | None = None
        self.fixup_idx = 0
        self.buffer = bytearray(FIXUP_BUF_SIZE)   # the one fixup buffer every address space maps
        self.stubs: dict[bytes, int] = {}   # covered code bytes -> address of the stub's pointer
        self.patched: set[int] = set()      # sites patched (by address, in whichever process)
        self.hazards: list[str] = []
        self.domain = None
        self.refusal: str | None = None    # the first image maps the buffer's pages itself

    def attach(self, domain) -> None:
        self.domain = domain
        self.refusal = self._map_buffer(domain.process)
        self.patch_set = P.new_patch_set(domain, self.name)
        self.patch_set.in_place = False
        self.patch_set.out_of_line = {"address": f"{FIXUP_BUF_USER:#x}", "size": f"{FIXUP_BUF_SIZE:#x}", "bytes": ""}
        self.watch_leaks(domain)

    def attach_process(self, domain, process, how: str) -> str | None:
        """fork: the child's memory is a copy, the buffer included; exec: the new address space maps
        the buffer with every stub made so far (see the module docstring)."""
        return self._map_buffer(process) if how == "exec" else None

    def _map_buffer(self, process) -> str | None:
        """Map the buffer, with every stub so far, into ``process``'s address space and reserve it
        there (the memory system calls refuse to touch it, as XenLinux kept those pages out of
        the process's reach); why not, if its image already maps those pages."""
        mem = process.vcpu.mem
        if any(r.start < FIXUP_BUF_USER + FIXUP_BUF_SIZE and r.end > FIXUP_BUF_USER for r in mem.regions()):
            return (f"{self.name}: the program maps the fixup buffer's pages ({FIXUP_BUF_USER:#x}-"
                    f"{FIXUP_BUF_USER + FIXUP_BUF_SIZE:#x}) itself (XenLinux reserved them)")
        mem.map(FIXUP_BUF_USER, FIXUP_BUF_SIZE, PROT_READ | PROT_EXEC, "[fixup]")
        mem.write(FIXUP_BUF_USER, bytes(self.buffer))
        process.reserved.append((FIXUP_BUF_USER, FIXUP_BUF_USER + FIXUP_BUF_SIZE, "the fixup buffer"))
        return None

    def _write_buffer(self, domain, address: int, blob: bytes) -> None:
        """New bytes in the buffer: in every live address space that maps it (one set of pages in
        XenLinux); the reservation keeps guests from changing their view of it, and a space whose
        view is not the read-only buffer (never, short of a bug) is left alone."""
        at = address - FIXUP_BUF_USER
        self.buffer[at:at + len(blob)] = blob
        kernel = getattr(domain, "kernel", None)
        spaces = [q.vcpu for q in kernel.live_processes() if q.vcpu is not None] if kernel else [domain.vcpu]
        for vcpu in spaces:
            region = vcpu.mem.region_at(address)
            if (region is None or region.name != "[fixup]" or region.prot & PROT_WRITE
                    or not vcpu.mem.is_mapped(address, len(blob))):
                continue
            vcpu.mem.write(address, blob)
            vcpu.invalidate_code(address, len(blob))

    # ------------------------------------------------------------ faults
    def step(self, trap: Trap, insn) -> Verdict:
        if self.refusal is not None:
            return Verdict.kill(self.refusal)
        # 1. Xen: seg_fixup flips (or refuses), then bounces vector 15 to the guest kernel
        verdict = super().step(trap, insn)
        if verdict.action is not Action.RESTART:
            return verdict
        self.counters.notifications += 1
        # 2. XenLinux: do_fixup_4gb_segment
        self._fixup(trap.domain, trap.violation.eip, insn)
        return verdict

    def _fixup(self, domain, eip: int, insn) -> None:
        c = self.counters
        ok, why = coverage.fixup_2004_handles(insn)
        if not ok:
            c.count(f"not patched: {why}")
            return
        notify_len = coverage.seg_fixup_notify_length(insn)
        if notify_len is not None and notify_len != insn.length:
            c.count("2004-length-bug")
        mem = domain.vcpu.mem
        n = MAX_PATCHED
        while n > 0 and not mem.is_mapped(eip, n):
            n -= 1
        code = mem.read(eip, n)
        try:
            # reuse a stub made for the same code bytes (de-duplication)
            for key, ptr in self.stubs.items():
                if code[: len(key)] == key:
                    covered, stub_ptr = len(key), ptr
                    c.count("stub-reused")
                    break
            else:
                stub, covered, _notes = build_stub(eip, code, insn)
                stub_ptr = None
            if ((eip ^ (eip + covered - 1)) & ~0xFFF) != 0:
                raise CannotPatch("patch would straddle a page boundary")
            allowed, why = patch_allowed(domain, eip, covered, self.patch_policy)
            if not allowed:
                raise CannotPatch(why)
            if stub_ptr is None:
                if self.fixup_idx > self.buffer_size - FIXUP_RESERVE or \
                        self.fixup_idx + 4 + len(stub) > self.buffer_size:
                    c.count("out-of-room")
                    return
                stub_ptr = FIXUP_BUF_USER + self.fixup_idx
                blob = (stub_ptr + 4).to_bytes(4, "little") + stub
                self._write_buffer(domain, stub_ptr, blob)
                self.fixup_idx += len(blob)
                self.stubs[bytes(code[:covered])] = stub_ptr
                self.patch_set.out_of_line["bytes"] = bytes(self.buffer[:self.fixup_idx]).hex()
                self.patch_set.patches.append(P.Patch(
                    address=stub_ptr, symbol=f"[fixup]+{stub_ptr - FIXUP_BUF_USER:#x}", file_offset=None,
                    old=bytes(len(blob)).hex(), new=blob.hex(), strategy=self.name, kind="fixup-stub",
                    instruction=P.disassemble(insn.raw, eip),
                    why=f"stub for the site at {eip:#010x} ({covered} bytes covered)"))
                c.count("stub-created")
        except CannotPatch as exc:
            c.count(f"not patched: {exc}")
            return
        patch = b"\x67\xff\x16" + stub_ptr.to_bytes(2, "little") + b"\x90" * (covered - PATCH_LEN)
        P.patch_code(domain, eip, patch, patch_set=self.patch_set, kind="call-fixup",
                     instruction=P.disassemble(insn.raw, eip), expect=bytes(code[:covered]),
                     why=f"call *{stub_ptr:#06x} (stub at {stub_ptr + 4:#06x}); {covered} bytes covered",
                     shared=self.page_sharing == "shared")
        if FIXUP_BUF_USER <= eip < FIXUP_BUF_USER + FIXUP_BUF_SIZE:   # a site in the buffer (policy all)
            self._write_buffer(domain, eip, patch)
        self.patch_set.in_place = False
        self.patched.add(eip)
        c.patches += 1
