"""Signal delivery on i386: default actions, handler frames, sigreturn.

A handler is entered as Linux's ``ia32_setup_frame``/``ia32_setup_rt_frame``
enter it (arch/x86/kernel/signal_32.c, arch/x86/include/asm/sigframe.h): below
the interrupted stack pointer, aligned so that ``(esp + 4) % 16 == 0`` at
entry, a frame holding the return address (glibc's ``sa_restorer``:
``__restore`` -> sigreturn(119), ``__restore_rt`` -> rt_sigreturn(173)), the
signal number and the interrupted registers (``struct sigcontext``, 88
bytes); an rt frame adds ``siginfo`` (128 bytes) and a ``ucontext`` whose
``uc_mcontext`` is that sigcontext and ``uc_sigmask`` the old mask.
sigreturn reads the registers back from where the frame says.

An SA_ONSTACK handler runs on the thread's sigaltstack (``setup_frame``'s
``altstack``), as Linux's ``get_sigframe`` chooses it.

Not modelled (stated): FPU/SSE state is not saved in the frame (handlers that
use floating point could disturb the interrupted code); stop and continue
signals are ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tlslab.machine import layout
from tlslab.machine.memory import GuestFault

SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE = 1, 2, 3, 4, 5, 6, 7, 8
SIGKILL, SIGUSR1, SIGSEGV, SIGUSR2, SIGPIPE, SIGALRM, SIGTERM = 9, 10, 11, 12, 13, 14, 15
SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU, SIGURG, SIGWINCH = 17, 18, 19, 20, 21, 22, 23, 28
SIG_DFL, SIG_IGN = 0, 1
SA_SIGINFO, SA_ONSTACK, SA_RESTART, SA_NODEFER, SA_RESETHAND = 0x4, 0x08000000, 0x10000000, 0x40000000, 0x80000000
SA_RESTORER = 0x04000000
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3
NR_SIGRETURN, NR_RT_SIGRETURN = 119, 173

IGNORED_BY_DEFAULT = {SIGCHLD, SIGCONT, SIGURG, SIGWINCH, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU}
CORE_BY_DEFAULT = {SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV}
UNBLOCKABLE = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1))

# struct sigcontext (i386), in order
SIGCONTEXT_REGS = ("gs", "fs", "es", "ds", "edi", "esi", "ebp", "esp", "ebx", "edx", "ecx", "eax",
                   "trapno", "err", "eip", "cs", "eflags", "esp_at_signal", "ss", "fpstate", "oldmask", "cr2")
SIGCONTEXT = struct.Struct("<22I")
SIGINFO_SIZE = 128
UCONTEXT_HEAD = 20                      # uc_flags, uc_link, uc_stack (ss_sp, ss_flags, ss_size)
RT_OFF_INFO = 16                        # pretcode, sig, pinfo, puc
RT_OFF_UC = RT_OFF_INFO + SIGINFO_SIZE
RT_OFF_MCONTEXT = RT_OFF_UC + UCONTEXT_HEAD
RT_OFF_SIGMASK = RT_OFF_MCONTEXT + SIGCONTEXT.size
RT_OFF_RETCODE = RT_OFF_SIGMASK + 8
RT_FRAME_SIZE = RT_OFF_RETCODE + 8
OFF_SC = 8                              # non-rt: pretcode, sig, then sigcontext
OFF_EXTRAMASK = OFF_SC + SIGCONTEXT.size
OFF_RETCODE = OFF_EXTRAMASK + 4
FRAME_SIZE = OFF_RETCODE + 8
RETCODE = bytes.fromhex("58b877000000cd80")     # popl %eax; movl $119,%eax; int $0x80
RT_RETCODE = bytes.fromhex("b8ad000000cd8000")  # movl $173,%eax; int $0x80


def bit(sig: int) -> int:
    return 1 << (sig - 1)


@dataclass(frozen=True)
class SigAction:
    handler: int
    flags: int
    restorer: int
    mask: int

    @classmethod
    def unpack(cls, raw: bytes) -> SigAction:
        handler, flags, restorer, mask = struct.unpack("<IIIQ", raw[:20])
        return cls(handler, flags, restorer, mask)


DEFAULT_ACTION = SigAction(SIG_DFL, 0, 0, 0)


def default_terminates(sig: int) -> bool:
    return sig not in IGNORED_BY_DEFAULT


def siginfo(sig: int, code: int = 0, pid: int = 0, uid: int = 0, status: int = 0) -> bytes:
    head = struct.pack("<iiiIIi", sig, 0, code, pid, uid, status)
    return head + bytes(SIGINFO_SIZE - len(head))


def _sigcontext(regs, oldmask: int) -> bytes:
    values = []
    for name in SIGCONTEXT_REGS:
        if name in ("trapno", "err", "fpstate", "cr2"):
            values.append(0)
        elif name == "esp_at_signal":
            values.append(regs.get("esp"))
        elif name == "oldmask":
            values.append(oldmask & 0xFFFFFFFF)
        else:
            values.append(regs.get(name) & (0xFFFF if name in ("gs", "fs", "es", "ds", "cs", "ss") else 0xFFFFFFFF))
    return SIGCONTEXT.pack(*values)


SS_ONSTACK, SS_DISABLE = 1, 2
MINSIGSTKSZ = 2048


def on_stack(altstack: tuple[int, int] | None, esp: int) -> bool:
    """Is ``esp`` on the alternate signal stack (base, size)?"""
    return altstack is not None and altstack[0] < esp <= altstack[0] + altstack[1]


def setup_frame(mem, regs, sig: int, action: SigAction, oldmask: int, info: bytes,
                altstack: tuple[int, int] | None = None) -> None:
    """Push a handler frame for ``sig`` and point the registers at the handler: on the alternate
    stack ``altstack`` (base, size; sigaltstack) for an SA_ONSTACK handler not already running
    there, as Linux's get_sigframe does."""
    rt = bool(action.flags & SA_SIGINFO)
    size = RT_FRAME_SIZE if rt else FRAME_SIZE
    esp = regs.get("esp")
    top = esp
    if altstack is not None and action.flags & SA_ONSTACK and not on_stack(altstack, esp):
        top = altstack[0] + altstack[1]
    # 32-bit arithmetic as on the CPU; a frame that lands outside the guest's mapped memory is not
    # written (GuestFault: the kernel kills the process with SIGSEGV)
    sp = ((((top - size + 4) & ~0xF) - 4) & 0xFFFFFFFF)
    if sp + size > 1 << 32:
        raise GuestFault(sp, size)
    sc = _sigcontext(regs, oldmask)
    if rt:
        retcode_at = sp + RT_OFF_RETCODE
        pretcode = action.restorer if action.flags & SA_RESTORER else retcode_at
        frame = struct.pack("<IiII", pretcode, sig, sp + RT_OFF_INFO, sp + RT_OFF_UC) + info
        stack = ((altstack[0], SS_ONSTACK if on_stack(altstack, esp) else 0, altstack[1])
                 if altstack is not None else (0, SS_DISABLE, 0))
        frame += struct.pack("<II", 0, 0) + struct.pack("<IiI", *stack) + sc + oldmask.to_bytes(8, "little")
        frame += RT_RETCODE
    else:
        retcode_at = sp + OFF_RETCODE
        pretcode = action.restorer if action.flags & SA_RESTORER else retcode_at
        frame = struct.pack("<Ii", pretcode, sig) + sc + ((oldmask >> 32) & 0xFFFFFFFF).to_bytes(4, "little")
        frame += RETCODE
    mem.write(sp, frame)
    regs.set("esp", sp)
    regs.set("eip", action.handler)
    regs.set("eax", sig)
    regs.set("edx", sp + RT_OFF_INFO if rt else 0)
    regs.set("ecx", sp + RT_OFF_UC if rt else 0)
    regs.set("eflags", regs.get("eflags") & ~0x100)  # TF off
    for seg in ("ds", "es"):
        if regs.get(seg) & 0xFFFF != layout.USER_DS:
            regs.set(seg, layout.USER_DS)


def restore_frame(mem, regs, rt: bool) -> tuple[int, int]:
    """sigreturn/rt_sigreturn: reload the registers; returns (eax to return, the mask to restore)."""
    esp = regs.get("esp")
    if rt:
        frame = (esp - 4) & 0xFFFFFFFF
        values = SIGCONTEXT.unpack(mem.read(frame + RT_OFF_MCONTEXT, SIGCONTEXT.size))
        mask = int.from_bytes(mem.read(frame + RT_OFF_SIGMASK, 8), "little")
    else:
        frame = (esp - 8) & 0xFFFFFFFF
        values = SIGCONTEXT.unpack(mem.read(frame + OFF_SC, SIGCONTEXT.size))
        extra = int.from_bytes(mem.read(frame + OFF_EXTRAMASK, 4), "little")
        mask = values[SIGCONTEXT_REGS.index("oldmask")] | (extra << 32)
    saved = dict(zip(SIGCONTEXT_REGS, values))
    for name in ("edi", "esi", "ebp", "esp", "ebx", "edx", "ecx", "eip"):
        regs.set(name, saved[name])
    # user-modifiable flags only (AC OF DF TF SF ZF AF PF CF and RF), as the kernel's FIX_EFLAGS
    keep = 0x40DD5
    regs.set("eflags", (regs.get("eflags") & ~keep) | (saved["eflags"] & keep))
    for seg in ("gs", "fs", "es", "ds"):
        selector = saved[seg] & 0xFFFF
        if selector != regs.get(seg) & 0xFFFF:
            regs.set(seg, selector)
    return saved["eax"], mask
