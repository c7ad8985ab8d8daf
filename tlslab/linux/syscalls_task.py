"""Process and thread lifetime: fork, vfork, clone, execve, exit, wait4, kill, futex, pipes, sigreturn.

The calls act on the guest kernel (``tlslab.linux.kernel``): a call that must
wait raises ``Block`` and is re-run when its condition holds. Semantics follow
Linux i386 as glibc 2.36 and dash 0.5.12 use them (measured with strace on
Debian 12; docs/measurements.md): pthread_create is clone(0x3d0f00 =
VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID) after
clone3 fails with ENOSYS; fork is clone(SIGCHLD|CHILD_SETTID|CHILD_CLEARTID);
dash runs commands with vfork (done here as fork, which Linux permits) and
reaps with wait4(-1).
"""

from __future__ import annotations

import os
import struct

from tlslab.linux import errno as E
from tlslab.linux import nodes as N
from tlslab.linux import signals as SIG
from tlslab.linux import structs as S
from tlslab.linux.elf import EXECUTABLE, ElfError, parse_elf_bytes
from tlslab.linux.errno import SyscallError
from tlslab.linux.files import O_CLOEXEC, O_NONBLOCK, O_RDONLY, O_WRONLY, OpenFile
from tlslab.linux.kernel import TLS_SLOTS, Block
from tlslab.linux.pipes import Pipe
from tlslab.linux.syscall_table import signed, syscall
from tlslab.linux.syscalls_proc import ProcessExit, clock_ns, timespec_ns
from tlslab.x86.descriptor import UserDesc

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_VFORK, CLONE_PARENT, CLONE_THREAD, CLONE_SYSVSEM = 0x4000, 0x8000, 0x10000, 0x40000
CLONE_SETTLS, CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x80000, 0x100000, 0x200000, 0x1000000
WNOHANG, WUNTRACED = 1, 2
RUSAGE_SIZE = 72
MAX_ARGS = 4096
MAX_SHEBANG_DEPTH = 4
FUTEX_WAIT, FUTEX_WAKE, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE = 0, 1, 3, 4
FUTEX_WAKE_OP, FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 5, 9, 10


def _kernel(p):
    if p.kernel is None:
        raise SyscallError(E.ENOSYS, "no guest kernel (a bare process)")
    return p.kernel


# ------------------------------------------------------------------ ids
@syscall("getpid")
def sys_getpid(p):
    return p.pid


@syscall("gettid")
def sys_gettid(p):
    return p.task.tid


@syscall("getppid")
def sys_getppid(p):
    return p.ppid


@syscall("set_tid_address")
def sys_set_tid_address(p, tidptr):
    p.task.clear_child_tid = tidptr
    return p.task.tid


@syscall("set_robust_list")
def sys_set_robust_list(p, head, length):
    if length != 12:
        raise SyscallError(E.EINVAL)
    p.task.robust_list = head
    return 0


@syscall("sched_yield")
def sys_sched_yield(p):
    if p.kernel is not None:
        p.kernel.yield_requested = True
    return 0


# ------------------------------------------------------------------ exit
@syscall("exit")
def sys_exit(p, status):
    if p.kernel is None:
        raise ProcessExit(status & 0xFF)
    p.kernel.exit_thread(p.task, status & 0xFF)
    return 0


@syscall("exit_group")
def sys_exit_group(p, status):
    if p.kernel is None:
        raise ProcessExit(status & 0xFF)
    p.kernel.exit_process(p, status & 0xFF, 0)
    return 0


# ------------------------------------------------------------------ fork, clone
def _read_user_desc(p, addr: int):
    try:
        ud = UserDesc.unpack(p.mem.read(addr, 16))
    except ValueError:
        raise SyscallError(E.EINVAL, "bad struct user_desc") from None
    if ud.entry_number not in TLS_SLOTS:
        raise SyscallError(E.EINVAL, f"CLONE_SETTLS entry {ud.entry_number}")
    if not ud.seg_32bit or ud.contents > 1 or ud.seg_not_present:
        raise SyscallError(E.EINVAL, "tls_desc_okay refuses it")
    return ud.entry_number, ud.to_descriptor()


def do_clone(p, flags: int, stack: int, ptid: int, tls: int, ctid: int) -> int:
    k = _kernel(p)
    if flags & CLONE_THREAD:
        if not flags & CLONE_VM or not flags & CLONE_SIGHAND:
            raise SyscallError(E.EINVAL, "CLONE_THREAD needs CLONE_VM and CLONE_SIGHAND")
        tls_desc = _read_user_desc(p, tls) if flags & CLONE_SETTLS else None
        task = k.clone_thread(p.task, stack, tls_desc)
        if flags & CLONE_PARENT_SETTID:
            p.mem.write_u32(ptid, task.tid)
        if flags & CLONE_CHILD_SETTID:
            p.mem.write_u32(ctid, task.tid)
        if flags & CLONE_CHILD_CLEARTID:
            task.clear_child_tid = ctid
        if tls_desc is not None:
            p.counters.set_thread_area += 1
        return task.tid
    if flags & CLONE_VM and not flags & CLONE_VFORK:
        raise SyscallError(E.EINVAL, "a shared address space without CLONE_THREAD is not modelled")
    child = k.fork(p.task, stack)
    if flags & CLONE_SETTLS:
        slot, requested = _read_user_desc(p, tls)
        child.task.tls[slot] = requested
    if flags & CLONE_CHILD_SETTID:
        child.mem.write_u32(ctid, child.pid)
    if flags & CLONE_CHILD_CLEARTID:
        child.task.clear_child_tid = ctid
    if flags & CLONE_PARENT_SETTID:
        p.mem.write_u32(ptid, child.pid)
    return child.pid


@syscall("fork")
def sys_fork(p):
    return do_clone(p, SIG.SIGCHLD, 0, 0, 0, 0)


@syscall("vfork")
def sys_vfork(p):
    """vfork as fork: the child gets a copy instead of borrowing the parent's memory (Linux allows it)."""
    return do_clone(p, SIG.SIGCHLD, 0, 0, 0, 0)


@syscall("clone")
def sys_clone(p, flags, stack, ptid, tls, ctid):
    return do_clone(p, flags, stack, ptid, tls, ctid)


@syscall("clone3")
def sys_clone3(p, args, size):
    raise SyscallError(E.ENOSYS, "clone3: glibc falls back to clone")


# ------------------------------------------------------------------ execve
def _strings(p, addr: int) -> list[bytes]:
    out = []
    if not addr:
        return out
    for i in range(MAX_ARGS):
        ptr = p.mem.read_u32(addr + 4 * i)
        if ptr == 0:
            return out
        out.append(p.mem.read_cstring(ptr, 131072))
    raise SyscallError(E.E2BIG)


def _program(p, path: bytes, argv: list[bytes], depth: int = 0):
    """(host path, guest path, argv) of what execve(path, argv) runs, following #! lines."""
    node = p.vfs.resolve(path)
    if isinstance(node, N.Dir):
        raise SyscallError(E.EACCES)
    if not isinstance(node, N.File) or not p.vfs.may(node, 1):
        raise SyscallError(E.EACCES)
    head = node.read_at(0, 256)
    if head.startswith(b"#!"):
        if depth >= MAX_SHEBANG_DEPTH:
            raise SyscallError(E.ELOOP)
        line = head[2:].split(b"\n", 1)[0].strip()
        if not line:
            raise SyscallError(E.ENOEXEC)
        interp, _, arg = line.partition(b" ")
        arg = arg.strip()
        new_argv = [interp, *([arg] if arg else []), path, *argv[1:]]
        return _program(p, interp, new_argv, depth + 1)
    if node.host_path is None:
        raise SyscallError(E.ENOEXEC, "only files of the root filesystem can be executed")
    try:
        parse_elf_bytes(os.fsdecode(path), node.read_at(0, node.size), EXECUTABLE)
    except ElfError as exc:
        raise SyscallError(E.ENOEXEC, str(exc)) from None
    if node is p.exe_node():   # /proc/self/exe: the new image's own link names the program, not itself
        path = p.guest_path
    return os.fsdecode(node.host_path), path, argv


@syscall("execve")
def sys_execve(p, path, argv, envp):
    k = _kernel(p)
    name = p.mem.read_cstring(path, 4096)
    args, env = _strings(p, argv), _strings(p, envp)
    host_path, guest_path, args = _program(p, name, args or [name])
    k.exec_image(p.task, lambda vcpu: p.replace_image(vcpu, host_path, guest_path, args, env))
    return 0


# ------------------------------------------------------------------ wait
def _matching_children(p, pid: int) -> list:
    children = [c for c in p.children if not c.reaped]
    if pid > 0:
        return [c for c in children if c.pid == pid]
    return children  # -1: any child; 0 and < -1 (process groups): every child is in ours


def do_wait(p, pid: int, status_addr: int, options: int, rusage: int) -> int:
    k = _kernel(p)
    pid = signed(pid)
    children = _matching_children(p, pid)
    if not children:
        raise SyscallError(E.ECHILD)
    zombie = next((c for c in children if c.zombie), None)
    if zombie is not None:
        zombie.reaped = True
        if status_addr:
            p.mem.write_u32(status_addr, k.wait_status(zombie))
        if rusage:
            p.mem.write(rusage, bytes(RUSAGE_SIZE))
        return zombie.pid
    if options & WNOHANG:
        return 0
    raise Block(f"wait4({pid})", lambda: any(c.zombie and not c.reaped for c in children))


@syscall("wait4")
def sys_wait4(p, pid, status, options, rusage):
    return do_wait(p, pid, status, options, rusage)


@syscall("waitpid")
def sys_waitpid(p, pid, status, options):
    return do_wait(p, pid, status, options, 0)


# ------------------------------------------------------------------ signals
def _target(p, pid: int):
    k = p.kernel
    if k is None:
        return [p] if pid in (p.pid, 0, -1) else []
    if pid > 0:
        return [q for q in k.processes if q.pid == pid and q.alive]
    if pid == -1:
        return [q for q in k.live_processes() if q is not k.init or q is p]
    group = p.pgid if pid == 0 else -pid   # a process group: the caller's (0) or |pid|
    return [q for q in k.live_processes() if q.pgid == group]


@syscall("kill")
def sys_kill(p, pid, sig):
    if not 0 <= sig <= 64:
        raise SyscallError(E.EINVAL)
    targets = _target(p, signed(pid))
    if not targets:
        raise SyscallError(E.ESRCH)
    for q in targets:
        _send(p, q, sig)
    return 0


SI_USER, SI_TKILL = 0, -6   # si_code: kill(2); tkill(2)/tgkill(2) (raise)


def _send(p, q, sig: int, task=None, code: int = SI_USER) -> None:
    if sig == 0:
        return
    if q.kernel is None:
        action = q.sigaction(sig)
        if sig == SIG.SIGKILL or action.handler == SIG.SIG_DFL and SIG.default_terminates(sig):
            raise ProcessExit(128 + sig, signal=sig)
        return
    q.kernel.send_signal(q, sig, SIG.siginfo(sig, code, p.pid, p.vfs.uid), task)


def _queueinfo(p, q, sig: int, uinfo: int, task=None) -> int:
    """rt_(tg)sigqueueinfo (sigqueue): the caller's own siginfo. Another process may only be sent
    si_code < 0 (user codes such as SI_QUEUE): Linux refuses to let a process forge a kernel's."""
    if not 0 <= sig <= 64:
        raise SyscallError(E.EINVAL)
    info = bytearray(p.mem.read(uinfo, SIG.SIGINFO_SIZE))
    code = struct.unpack_from("<i", info, 8)[0]
    if (code >= 0 or code == SI_TKILL) and q is not p:
        raise SyscallError(E.EPERM)
    struct.pack_into("<i", info, 0, sig)
    if sig and q.kernel is not None:
        q.kernel.send_signal(q, sig, bytes(info), task)
    elif sig:
        _send(p, q, sig, task)
    return 0


@syscall("rt_sigqueueinfo")
def sys_rt_sigqueueinfo(p, pid, sig, uinfo):
    targets = _target(p, signed(pid)) if signed(pid) > 0 else []
    if not targets:
        raise SyscallError(E.ESRCH)
    return _queueinfo(p, targets[0], sig, uinfo)


@syscall("rt_tgsigqueueinfo")
def sys_rt_tgsigqueueinfo(p, tgid, tid, sig, uinfo):
    task = next((t for t in p.kernel.runq if t.tid == tid), None) if p.kernel is not None else (
        p.task if tid == p.task.tid else None)
    if task is None or task.process.pid != signed(tgid):
        raise SyscallError(E.ESRCH)
    return _queueinfo(p, task.process, sig, uinfo, task)


@syscall("tgkill")
def sys_tgkill(p, tgid, tid, sig):
    return _tkill(p, tid, sig)


@syscall("tkill")
def sys_tkill(p, tid, sig):
    return _tkill(p, tid, sig)


def _tkill(p, tid: int, sig: int) -> int:
    if not 0 <= sig <= 64:
        raise SyscallError(E.EINVAL)
    if p.kernel is None:
        if tid != p.task.tid:
            raise SyscallError(E.ESRCH)
        _send(p, p, sig)
        return 0
    task = next((t for t in p.kernel.runq if t.tid == tid), None)
    if task is None:
        raise SyscallError(E.ESRCH)
    _send(p, task.process, sig, task, SI_TKILL)
    return 0


@syscall("rt_sigreturn")
def sys_rt_sigreturn(p):
    eax, mask = SIG.restore_frame(p.mem, p.vcpu.regs, rt=True)
    p.task.sigmask = mask & ~SIG.UNBLOCKABLE
    return eax


@syscall("sigreturn")
def sys_sigreturn(p):
    eax, mask = SIG.restore_frame(p.mem, p.vcpu.regs, rt=False)
    p.task.sigmask = mask & ~SIG.UNBLOCKABLE
    return eax


# ------------------------------------------------------------------ futex
FUTEX_CLOCK_REALTIME = 256


def _deadline(p, timeout: int, fmt, absolute: bool, clock_id: int) -> int | None:
    """A wait's timeout as a deadline on the kernel's guest clock (None: no timeout)."""
    if not timeout:
        return None
    ns = timespec_ns(p, timeout, fmt)
    if absolute:
        ns = max(0, ns - clock_ns(p, clock_id))
    return p.kernel.elapsed_ns() + ns if p.kernel is not None else ns


@syscall("futex")
def sys_futex(p, uaddr, op, val, timeout, uaddr2, val3):
    return _futex(p, uaddr, op, val, timeout, uaddr2, val3, S.TIMESPEC32)


@syscall("futex_time64")
def sys_futex_time64(p, uaddr, op, val, timeout, uaddr2, val3):
    return _futex(p, uaddr, op, val, timeout, uaddr2, val3, S.TIMESPEC64)


def _futex(p, uaddr, op, val, timeout, uaddr2, val3, fmt):
    cmd = op & 0x7F
    k = p.kernel
    if cmd in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        if p.mem.read_u32(uaddr) != val:
            raise SyscallError(E.EAGAIN)
        bitset = val3 if cmd == FUTEX_WAIT_BITSET else 0xFFFFFFFF
        if bitset == 0:
            raise SyscallError(E.EINVAL)
        # FUTEX_WAIT's timeout is relative; FUTEX_WAIT_BITSET's absolute (MONOTONIC, or REALTIME by flag)
        deadline = _deadline(p, timeout, fmt, cmd == FUTEX_WAIT_BITSET,
                             0 if op & FUTEX_CLOCK_REALTIME else 1)
        if k is None:
            if deadline is not None:
                p.sleep(deadline)
            raise SyscallError(E.ETIMEDOUT if deadline is not None else E.EINTR)
        if len(k.runq) <= 1 and deadline is None and k.next_timer_ns() is None:
            # nobody and nothing could ever wake it: it would hang forever
            raise SyscallError(E.EINTR)
        raise k.futex_wait(p.task, uaddr, bitset, deadline)
    if cmd in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
        if k is None:
            return 0
        return k.futex_wake(p, uaddr, val, val3 if cmd == FUTEX_WAKE_BITSET else 0xFFFFFFFF)
    if cmd in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
        if cmd == FUTEX_CMP_REQUEUE and p.mem.read_u32(uaddr) != val3:
            raise SyscallError(E.EAGAIN)
        if k is None:
            return 0
        return k.futex_requeue(p, uaddr, val, uaddr2, timeout)  # timeout carries nr_requeue
    raise SyscallError(E.ENOSYS, f"futex op {op}")


# ------------------------------------------------------------------ waiting for signals, alarms
def _no_kernel(p) -> None:
    if p.kernel is None:   # a bare process (no scheduler): nothing could ever arrive
        raise SyscallError(E.EINTR)


@syscall("pause")
def sys_pause(p):
    """Sleep until a signal runs a handler (-EINTR then) or ends the process."""
    _no_kernel(p)
    raise Block("pause", lambda: False, restartable=False)


@syscall("rt_sigsuspend")
def sys_rt_sigsuspend(p, mask, sigsetsize):
    """pause() with ``mask`` as the signal mask until a handler runs; its frame restores the old mask."""
    if sigsetsize != 8:
        raise SyscallError(E.EINVAL)
    _no_kernel(p)
    task = p.task
    if task.saved_sigmask is None:   # not when re-entered after an ignored wake-up
        task.saved_sigmask = task.sigmask
    task.sigmask = int.from_bytes(p.mem.read(mask, 8), "little") & ~SIG.UNBLOCKABLE
    raise Block("sigsuspend", lambda: False, restartable=False)


@syscall("rt_sigpending")
def sys_rt_sigpending(p, out, sigsetsize):
    if sigsetsize > 8:
        raise SyscallError(E.EINVAL)
    pending = 0
    for sig, _info in (*p.task.pending, *p.shared_pending):
        pending |= SIG.bit(sig)
    p.mem.write(out, pending.to_bytes(8, "little")[:sigsetsize])
    return 0


def _sigtimedwait(p, uthese, uinfo, uts, sigsetsize, fmt) -> int:
    """Take a pending signal of the set without running its handler; wait for one (until the
    timeout: -EAGAIN) if none is pending."""
    if sigsetsize != 8:
        raise SyscallError(E.EINVAL)
    these = int.from_bytes(p.mem.read(uthese, 8), "little") & ~SIG.UNBLOCKABLE
    task = p.task
    for queue in (task.pending, p.shared_pending):   # its own first, then the process's
        for entry in queue:
            if these & SIG.bit(entry[0]):
                queue.remove(entry)
                if uinfo:
                    p.mem.write(uinfo, entry[1])
                return entry[0]
    deadline = _deadline(p, uts, fmt, False, 1)
    if deadline is not None and deadline <= (p.kernel.elapsed_ns() if p.kernel is not None else 0):
        raise SyscallError(E.EAGAIN)
    _no_kernel(p)

    def timed_out() -> int:
        return -E.EAGAIN

    raise Block("sigtimedwait", lambda: any(these & SIG.bit(s) for s, _ in (*task.pending, *p.shared_pending)),
                deadline_ns=deadline, on_timeout=timed_out, restartable=False)


@syscall("rt_sigtimedwait")
def sys_rt_sigtimedwait(p, uthese, uinfo, uts, sigsetsize):
    return _sigtimedwait(p, uthese, uinfo, uts, sigsetsize, S.TIMESPEC32)


@syscall("rt_sigtimedwait_time64")
def sys_rt_sigtimedwait_time64(p, uthese, uinfo, uts, sigsetsize):
    return _sigtimedwait(p, uthese, uinfo, uts, sigsetsize, S.TIMESPEC64)


ITIMER_REAL = 0
ITIMERVAL32 = struct.Struct("<iIiI")   # it_interval {sec, usec}, it_value {sec, usec}


def _timer_left(p) -> tuple[int, int]:
    """(interval, time left) of the process's ITIMER_REAL, in ns."""
    k = p.kernel
    if k is None or p not in k.alarms:
        return 0, 0
    when, interval = k.alarms[p]
    return interval, max(1, when - k.elapsed_ns())


def _set_timer(p, value_ns: int, interval_ns: int) -> None:
    k = p.kernel
    if k is None:
        if value_ns:
            raise SyscallError(E.ENOSYS, "alarms need the scheduler")
        return
    k.set_alarm(p, value_ns, interval_ns)


def _itimerval(interval: int, left: int) -> bytes:
    left_us = (left + 999) // 1000   # a timer still armed reads at least 1 us, as on Linux
    return ITIMERVAL32.pack(interval // 10**9, interval % 10**9 // 1000, left_us // 10**6, left_us % 10**6)


@syscall("setitimer")
def sys_setitimer(p, which, new, old):
    """ITIMER_REAL on the guest clock: SIGALRM when it expires (Kernel.fire_alarms). The
    process-time timers (VIRTUAL, PROF) are refused with EINVAL."""
    if which != ITIMER_REAL:
        raise SyscallError(E.EINVAL, "only ITIMER_REAL")
    before = _timer_left(p)
    if new:
        isec, iusec, vsec, vusec = ITIMERVAL32.unpack(p.mem.read(new, ITIMERVAL32.size))
        if min(isec, vsec) < 0 or not (0 <= iusec < 10**6 and 0 <= vusec < 10**6):
            raise SyscallError(E.EINVAL)
        _set_timer(p, vsec * 10**9 + vusec * 1000, isec * 10**9 + iusec * 1000)
    if old:
        p.mem.write(old, _itimerval(*before))
    return 0


@syscall("getitimer")
def sys_getitimer(p, which, out):
    if which != ITIMER_REAL:
        raise SyscallError(E.EINVAL, "only ITIMER_REAL")
    p.mem.write(out, _itimerval(*_timer_left(p)))
    return 0


@syscall("alarm")
def sys_alarm(p, seconds):
    """Seconds left of the previous alarm (rounded to the nearest second, at least 1 while it is
    armed, as Linux's alarm_setitimer), and a new one-shot ITIMER_REAL."""
    _interval, left = _timer_left(p)
    _set_timer(p, seconds * 10**9, 0)
    if not left:
        return 0
    left_us = (left + 999) // 1000
    return max(1, left_us // 10**6 + (left_us % 10**6 >= 500_000))


# ------------------------------------------------------------------ pipes
def _pipe(p, fds_addr: int, flags: int) -> int:
    if flags & ~(O_CLOEXEC | O_NONBLOCK):
        raise SyscallError(E.EINVAL)
    pipe = Pipe(p.vfs.new_ino(), p.vfs.new_ino(), p.vfs.uid, p.vfs.gid)
    nb = flags & O_NONBLOCK
    cloexec = bool(flags & O_CLOEXEC)
    r = p.fds.install(OpenFile(pipe.read_end, O_RDONLY | nb, b"pipe:"), cloexec)
    try:
        w = p.fds.install(OpenFile(pipe.write_end, O_WRONLY | nb, b"pipe:"), cloexec)
    except SyscallError:
        p.fds.close(r)
        raise
    p.mem.write(fds_addr, struct.pack("<ii", r, w))
    return 0


@syscall("pipe")
def sys_pipe(p, fds):
    return _pipe(p, fds, 0)


@syscall("pipe2")
def sys_pipe2(p, fds, flags):
    return _pipe(p, fds, flags)
