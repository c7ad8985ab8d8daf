"""Identity, time, signal disposition, randomness, limits and TLS system calls.

Deterministic by construction: the clock is the guest instruction count (1 ns
per instruction, every process counted) plus any time the guest slept, from a
fixed epoch; random bytes come from the process seed. Process and thread
lifetime (fork, clone, exec, exit, wait, kill, futex) lives in
``syscalls_task``; signal delivery in ``signals`` and ``kernel``.
``rseq`` answers ENOSYS, which glibc 2.35+ tolerates (it then runs without
restartable sequences, as on kernels before 4.18).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tlslab.linux import errno as E
from tlslab.linux import structs as S
from tlslab.linux.errno import SyscallError
from tlslab.linux.signals import (
    MINSIGSTKSZ, SIG_DFL, SIG_IGN, SS_DISABLE, SS_ONSTACK, default_terminates, on_stack,
)
from tlslab.linux.syscall_table import signed, syscall
from tlslab.machine import layout
from tlslab.x86.descriptor import SegmentDescriptor, UserDesc

GUEST_EPOCH_NS = 1130803200 * 1_000_000_000   # 2005-11-01 00:00:00 UTC: "now" at instruction 0
BOOT_NS = 1000 * 1_000_000_000                 # CLOCK_MONOTONIC at instruction 0: up 1000 s
RLIM_INFINITY = 0xFFFFFFFF
RLIMITS = {0: (RLIM_INFINITY,) * 2, 1: (RLIM_INFINITY,) * 2, 2: (RLIM_INFINITY,) * 2,
           3: (layout.STACK_SIZE, RLIM_INFINITY), 4: (0, RLIM_INFINITY), 5: (RLIM_INFINITY,) * 2,
           6: (4096, 4096), 7: (1024, 4096), 8: (8 << 20, 8 << 20), 9: (RLIM_INFINITY,) * 2,
           10: (RLIM_INFINITY,) * 2, 11: (4096, 4096), 12: (819200, 819200), 13: (0, 0), 14: (0, 0),
           15: (RLIM_INFINITY,) * 2}
UNAME = (b"Linux", b"tlslab", b"6.1.0-tlslab", b"#1 SMP PREEMPT_DYNAMIC tlslab", b"i686", b"(none)")
SIGABRT, SIGKILL, SIGSEGV = 6, 9, 11
TLS_SLOTS = layout.TLS_SLOTS


class ProcessExit(Exception):
    """The guest ended: exit/exit_group status, or killed by ``signal``."""

    def __init__(self, status: int, signal: int = 0):
        super().__init__(f"killed by signal {signal}" if signal else f"exit status {status}")
        self.status = status
        self.signal = signal


@dataclass(frozen=True)
class TlsInstall:
    """One set_thread_area: what the guest asked for and what the policy installed."""

    instructions: int
    entry: int
    requested: SegmentDescriptor | None   # None: the slot was cleared
    installed: SegmentDescriptor | None
    user_desc: UserDesc


# ------------------------------------------------------------------ exit, ids
def _process(p, pid: int):
    """The live process ``pid`` names (0: the caller), else ESRCH."""
    pid = signed(pid)
    if pid == 0 or pid == p.pid:
        return p
    k = p.kernel   # a zombie (exited, not yet waited for) still answers
    found = next((q for q in k.processes if q.pid == pid and not getattr(q, "reaped", False)),
                 None) if k is not None else None
    if found is None or pid < 0:
        raise SyscallError(E.ESRCH)
    return found


@syscall("getpgrp")
def sys_getpgrp(p):
    return p.pgid


@syscall("getpgid")
def sys_getpgid(p, pid):
    return _process(p, pid).pgid


@syscall("getsid")
def sys_getsid(p, pid):
    return _process(p, pid).sid


@syscall("setpgid")
def sys_setpgid(p, pid, pgid):
    """Linux's rules: the caller or one of its children (not yet exec'ed: not modelled), in the
    caller's session, not a session leader; the group must exist in that session or be the
    process's own pid."""
    if signed(pgid) < 0:
        raise SyscallError(E.EINVAL)
    q = _process(p, pid)
    if q is not p and getattr(q, "parent", None) is not p:
        raise SyscallError(E.ESRCH)
    pgid = pgid or q.pid
    if q.sid != p.sid or q.pid == q.sid:
        raise SyscallError(E.EPERM)
    if pgid != q.pid:
        members = p.kernel.live_processes() if p.kernel is not None else [p]
        if not any(r.pgid == pgid and r.sid == p.sid for r in members):
            raise SyscallError(E.EPERM)
    q.pgid = pgid
    return 0


@syscall("setsid")
def sys_setsid(p):
    if p.pgid == p.pid or (p.kernel is not None and any(q.pgid == p.pid for q in p.kernel.live_processes())):
        raise SyscallError(E.EPERM)
    p.pgid = p.sid = p.pid
    return p.pid


PRIO_PROCESS, PRIO_PGRP, PRIO_USER = 0, 1, 2


def _prio_targets(p, which: int, who: int) -> list:
    k = p.kernel
    live = k.live_processes() if k is not None else [p]
    if which == PRIO_PROCESS:
        return [_process(p, who)]
    if which == PRIO_PGRP:
        group = who or p.pgid
        return [q for q in live if q.pgid == group]
    if which == PRIO_USER:
        uid = who or p.vfs.uid
        return [q for q in live if q.vfs.uid == uid]
    raise SyscallError(E.EINVAL)


@syscall("getpriority")
def sys_getpriority(p, which, who):
    """The best (lowest) nice value of the targets, as the raw call returns it: 20 - nice."""
    targets = _prio_targets(p, which, who)
    if not targets:
        raise SyscallError(E.ESRCH)
    return 20 - min(getattr(q, "nice", 0) for q in targets)


@syscall("setpriority")
def sys_setpriority(p, which, who, prio):
    """Nice values are kept (and inherited by fork) but do not change the deterministic scheduler.
    An unprivileged guest may only raise them, as on Linux without CAP_SYS_NICE."""
    targets = _prio_targets(p, which, who)
    if not targets:
        raise SyscallError(E.ESRCH)
    nice = max(-20, min(19, signed(prio)))
    for q in targets:
        if p.vfs.uid != 0 and (q.vfs.uid != p.vfs.uid or nice < getattr(q, "nice", 0)):
            raise SyscallError(E.EACCES if q.vfs.uid == p.vfs.uid else E.EPERM)
    for q in targets:
        q.nice = nice
    return 0


@syscall("getuid32", "geteuid32", "getuid", "geteuid")
def sys_getuid(p):
    return p.vfs.uid


@syscall("getgid32", "getegid32", "getgid", "getegid")
def sys_getgid(p):
    return p.vfs.gid


@syscall("getgroups32")
def sys_getgroups32(p, size, lst):
    if size:
        p.mem.write_u32(lst, p.vfs.gid)
    return 1


@syscall("rseq")
def sys_rseq(p, rseq, length, flags, sig):
    raise SyscallError(E.ENOSYS, "rseq refused: glibc falls back")


# ------------------------------------------------------------------ signal dispositions
@syscall("rt_sigaction")
def sys_rt_sigaction(p, sig, act, oldact, sigsetsize):
    if not 1 <= sig <= 64 or sig in (SIGKILL, 19) and act or sigsetsize != 8:
        raise SyscallError(E.EINVAL)
    old = p.sigactions.get(sig, bytes(20))
    if act:
        p.sigactions[sig] = p.mem.read(act, 20)
        action = p.sigaction(sig)
        if action.handler == SIG_IGN or (action.handler == SIG_DFL and not default_terminates(sig)):
            # POSIX: setting a pending signal to be ignored discards it, in every thread
            for queue in [p.shared_pending, *(t.pending for t in getattr(p, "threads", [p.task]))]:
                queue[:] = [entry for entry in queue if entry[0] != sig]
    if oldact:
        p.mem.write(oldact, old)
    return 0


@syscall("rt_sigprocmask")
def sys_rt_sigprocmask(p, how, nset, oset, sigsetsize):
    if sigsetsize != 8:
        raise SyscallError(E.EINVAL)
    old = p.sigmask
    if nset:
        new = int.from_bytes(p.mem.read(nset, 8), "little")
        if how == 0:
            p.sigmask |= new
        elif how == 1:
            p.sigmask &= ~new
        elif how == 2:
            p.sigmask = new
        else:
            raise SyscallError(E.EINVAL)
        p.sigmask &= ~((1 << (SIGKILL - 1)) | (1 << 18))  # KILL and STOP cannot be blocked
    if oset:
        p.mem.write(oset, old.to_bytes(8, "little"))
    return 0


STACK_T = struct.Struct("<IiI")   # ss_sp, ss_flags, ss_size


@syscall("sigaltstack")
def sys_sigaltstack(p, ss, old):
    """The calling thread's alternate signal stack, used by SA_ONSTACK handlers (signals.setup_frame)."""
    task = p.task
    esp = p.vcpu.regs.get("esp")
    current = task.altstack
    if old:
        flags = SS_DISABLE if current is None else (SS_ONSTACK if on_stack(current, esp) else 0)
        base, size = current if current is not None else (0, 0)
        p.mem.write(old, STACK_T.pack(base, flags, size))
    if ss:
        base, flags, size = STACK_T.unpack(p.mem.read(ss, STACK_T.size))
        if on_stack(current, esp):
            raise SyscallError(E.EPERM)
        if flags & ~SS_DISABLE & ~SS_ONSTACK & ~(1 << 31):   # SS_ONSTACK reads as 0; SS_AUTODISARM
            raise SyscallError(E.EINVAL)                        # (bit 31) accepted, not modelled
        if flags & SS_DISABLE:
            task.altstack = None
        else:
            if size < MINSIGSTKSZ:
                raise SyscallError(E.ENOMEM)
            task.altstack = (base, size)
    return 0


# ------------------------------------------------------------------ system info, limits
@syscall("uname")
def sys_uname(p, buf):
    p.mem.write(buf, S.pack_utsname(UNAME))
    return 0


@syscall("ugetrlimit", "getrlimit")
def sys_ugetrlimit(p, resource, rlim):
    if resource not in RLIMITS:
        raise SyscallError(E.EINVAL)
    p.mem.write(rlim, S.RLIMIT32.pack(*p.rlimits.get(resource, RLIMITS[resource])))
    return 0


@syscall("setrlimit")
def sys_setrlimit(p, resource, rlim):
    if resource not in RLIMITS:
        raise SyscallError(E.EINVAL)
    p.rlimits[resource] = S.RLIMIT32.unpack(p.mem.read(rlim, 8))
    return 0


@syscall("prlimit64")
def sys_prlimit64(p, pid, resource, new, old):
    if pid not in (0, p.pid):
        raise SyscallError(E.ESRCH)
    if resource not in RLIMITS:
        raise SyscallError(E.EINVAL)
    cur = p.rlimits.get(resource, RLIMITS[resource])
    if old:
        widen = lambda v: (1 << 64) - 1 if v == RLIM_INFINITY else v  # noqa: E731
        p.mem.write(old, S.RLIMIT64.pack(widen(cur[0]), widen(cur[1])))
    if new:
        lo, hi = S.RLIMIT64.unpack(p.mem.read(new, 16))
        p.rlimits[resource] = (min(lo, RLIM_INFINITY), min(hi, RLIM_INFINITY))
    return 0


@syscall("sched_getaffinity")
def sys_sched_getaffinity(p, pid, size, mask):
    if size < 4:
        raise SyscallError(E.EINVAL)
    p.mem.write(mask, (1).to_bytes(4, "little"))
    return 4


@syscall("prctl")
def sys_prctl(p, option, a2, a3, a4, a5):
    raise SyscallError(E.EINVAL, f"prctl option {option}")


# ------------------------------------------------------------------ time
def realtime_ns(p) -> int:
    """CLOCK_REALTIME now, in ns (file times the guest sets to "now")."""
    return GUEST_EPOCH_NS + p.elapsed_ns()


def _clock(p, clock_id: int) -> int:
    clock_id = signed(clock_id)
    if clock_id in (0, 5, 11):          # REALTIME, REALTIME_COARSE, TAI
        return GUEST_EPOCH_NS + p.elapsed_ns()
    if clock_id in (1, 4, 6, 7):        # MONOTONIC, _RAW, _COARSE, BOOTTIME
        return BOOT_NS + p.elapsed_ns()
    if clock_id in (2, 3):              # PROCESS/THREAD_CPUTIME: instructions only
        return p.vcpu.counters.instructions
    raise SyscallError(E.EINVAL, f"clock {clock_id}")


@syscall("time")
def sys_time(p, tloc):
    now = (GUEST_EPOCH_NS + p.elapsed_ns()) // 1_000_000_000
    if tloc:
        p.mem.write_u32(tloc, now)
    return now


@syscall("gettimeofday")
def sys_gettimeofday(p, tv, tz):
    ns = GUEST_EPOCH_NS + p.elapsed_ns()
    if tv:
        p.mem.write(tv, S.TIMEVAL32.pack(ns // 1_000_000_000, ns % 1_000_000_000 // 1000))
    if tz:
        p.mem.write(tz, bytes(8))
    return 0


@syscall("clock_gettime")
def sys_clock_gettime(p, clock_id, tp):
    ns = _clock(p, clock_id)
    p.mem.write(tp, S.TIMESPEC32.pack(ns // 1_000_000_000, ns % 1_000_000_000))
    return 0


@syscall("clock_gettime64")
def sys_clock_gettime64(p, clock_id, tp):
    ns = _clock(p, clock_id)
    p.mem.write(tp, S.TIMESPEC64.pack(ns // 1_000_000_000, ns % 1_000_000_000))
    return 0


@syscall("clock_getres")
def sys_clock_getres(p, clock_id, res):
    _clock(p, clock_id)
    if res:
        p.mem.write(res, S.TIMESPEC32.pack(0, 1))
    return 0


@syscall("clock_getres_time64")
def sys_clock_getres_time64(p, clock_id, res):
    _clock(p, clock_id)
    if res:
        p.mem.write(res, S.TIMESPEC64.pack(0, 1))
    return 0


TIMER_ABSTIME = 1


def _sleep(p, req: int, fmt, clock_id: int | None = None, flags: int = 0, rem: int = 0) -> int:
    """Guest time passes at once (``Process.sleep``); an alarm of the sleeper's own that expires first
    ends the sleep there with EINTR (the time left in ``rem`` for a relative sleep) if a handler
    is to run."""
    sec, nsec = fmt.unpack(p.mem.read(req, fmt.size))
    if sec < 0 or not 0 <= nsec < 1_000_000_000:
        raise SyscallError(E.EINVAL)
    ns = sec * 1_000_000_000 + nsec
    if clock_id is not None:
        now = _clock(p, clock_id)
        if signed(clock_id) in (2, 3):   # the CPU-time clocks cannot be slept on
            raise SyscallError(E.EINVAL)
        if flags & TIMER_ABSTIME:   # until the clock reads ``ns`` (now if it already does)
            ns = max(0, ns - now)
    k = p.kernel
    alarm = k.alarms.get(p) if k is not None else None
    if alarm is not None and alarm[0] < k.elapsed_ns() + ns:
        # the process's own alarm comes first: sleep until it, and a handler interrupts the sleep
        slept = max(0, alarm[0] - k.elapsed_ns())
        p.sleep(slept)
        k.fire_alarms()
        if k.signal_pending_for(p.task):
            if rem and not flags & TIMER_ABSTIME:
                left = ns - slept
                p.mem.write(rem, fmt.pack(left // 1_000_000_000, left % 1_000_000_000))
            raise SyscallError(E.EINTR)
        ns -= slept
    p.sleep(ns)
    return 0


def timespec_ns(p, addr: int, fmt) -> int:
    """A struct timespec (``fmt``: 32- or 64-bit) in ns; EINVAL if malformed."""
    sec, nsec = fmt.unpack(p.mem.read(addr, fmt.size))
    if sec < 0 or not 0 <= nsec < 1_000_000_000:
        raise SyscallError(E.EINVAL)
    return sec * 1_000_000_000 + nsec


def clock_ns(p, clock_id: int) -> int:
    """What ``clock_id`` reads now (clock_gettime's clocks)."""
    return _clock(p, clock_id)


@syscall("nanosleep")
def sys_nanosleep(p, req, rem):
    return _sleep(p, req, S.TIMESPEC32, rem=rem)


@syscall("clock_nanosleep")
def sys_clock_nanosleep(p, clock_id, flags, req, rem):
    return _sleep(p, req, S.TIMESPEC32, clock_id, flags, rem)


@syscall("clock_nanosleep_time64")
def sys_clock_nanosleep_time64(p, clock_id, flags, req, rem):
    return _sleep(p, req, S.TIMESPEC64, clock_id, flags, rem)


@syscall("times")
def sys_times(p, buf):
    ticks = p.vcpu.counters.instructions // 10_000_000  # 100 Hz at 1 ns per instruction
    if buf:
        p.mem.write(buf, ticks.to_bytes(4, "little") + bytes(12))
    return (BOOT_NS + p.elapsed_ns()) // 10_000_000 & 0x7FFFFFFF


# ------------------------------------------------------------------ randomness
@syscall("getrandom")
def sys_getrandom(p, buf, count, flags):
    if flags & ~0x7:
        raise SyscallError(E.EINVAL)
    count = min(count, 1 << 25)
    p.mem.write(buf, p.random_bytes(count))
    return count


# ------------------------------------------------------------------ TLS descriptors
def _is_empty(u: UserDesc) -> bool:
    """Linux LDT_empty / LDT_zero: a request that clears the slot."""
    zero = (u.base_addr == 0 and u.limit == 0 and u.contents == 0 and not u.seg_32bit
            and not u.limit_in_pages and not u.useable)
    return zero and ((u.read_exec_only and u.seg_not_present) or (not u.read_exec_only and not u.seg_not_present))


@syscall("set_thread_area")
def sys_set_thread_area(p, u_info):
    try:
        ud = UserDesc.unpack(p.mem.read(u_info, 16))
    except ValueError:
        raise SyscallError(E.EINVAL, "bad struct user_desc") from None
    index = ud.entry_number
    if index == 0xFFFFFFFF:
        free = [i for i in TLS_SLOTS if p.tls_requested.get(i) is None]
        if not free:
            raise SyscallError(E.ESRCH)
        index = free[0]
        p.mem.write_u32(u_info, index)
    elif index not in TLS_SLOTS:
        raise SyscallError(E.EINVAL)
    empty = _is_empty(ud)
    if not empty and (not ud.seg_32bit or ud.contents > 1 or ud.seg_not_present):
        raise SyscallError(E.EINVAL, "tls_desc_okay refuses it")  # Linux tls_desc_okay
    requested = None if empty else ud.to_descriptor()
    installed = None if empty else p.descriptor_policy(requested)
    p.vcpu.set_descriptor(index, installed)
    p.tls_requested[index] = requested
    p.tls_events.append(TlsInstall(p.vcpu.counters.instructions, index, requested, installed, ud))
    for hook in p.tls_hooks:
        hook(index, requested, installed)
    return 0


@syscall("get_thread_area")
def sys_get_thread_area(p, u_info):
    index = p.mem.read_u32(u_info)
    if index not in TLS_SLOTS:
        raise SyscallError(E.EINVAL)
    desc = p.tls_requested.get(index)
    if desc is None:
        ud = UserDesc(entry_number=index, seg_32bit=False, read_exec_only=True, seg_not_present=True)
    else:
        ud = UserDesc.from_descriptor(desc, entry_number=index)
    p.mem.write(u_info, ud.pack())
    return 0


@syscall("setuid32", "setuid")
def sys_setuid(p, uid):
    if p.vfs.uid not in (0, uid):
        raise SyscallError(E.EPERM)
    p.vfs.uid = uid
    return 0


@syscall("setgid32", "setgid")
def sys_setgid(p, gid):
    if p.vfs.uid != 0 and gid != p.vfs.gid:
        raise SyscallError(E.EPERM)
    p.vfs.gid = gid
    return 0


@syscall("sysinfo")
def sys_sysinfo(p, info):
    """A fixed 512 MiB machine with one process; uptime follows the guest clock."""
    uptime = (BOOT_NS + p.elapsed_ns()) // 1_000_000_000
    ram = 512 << 20
    data = struct.pack("<l3L6LHH2LI8x", uptime, 0, 0, 0, ram, ram // 2, 0, 0, 0, 0, 1, 0, 0, 0, 1)
    p.mem.write(info, data)
    return 0
