"""The guest kernel: processes and threads, a deterministic scheduler, and the one CPU's TLS slots.

Processes (``Process``: an address space on its own ``VCpu``, a descriptor
table, a working directory) hold one or more threads (``Task``: registers, its
own TLS array, a signal mask). One task runs at a time. The scheduler is
deterministic: it switches only when the running task blocks (a system call
that must wait: wait4, a pipe, a futex), exits, yields, or has used its time
slice (``quantum`` guest instructions, counted across exits: ``budget``), and
it always takes the first ready task in creation order after the current one. The same run therefore gives the same counters
every time. A task blocked in a system call is re-run from its ``int $0x80``
when what it waits for is ready (the call is restarted, as Linux restarts an
interrupted call).

The TLS slots model one CPU under XenLinux (docs/xenlinux-tls-context-switch.md):
the GDT has one set of TLS slots; at a switch, each slot whose descriptor in
the incoming thread's TLS array differs from the outgoing thread's is
rewritten through the hypervisor policy (truncated under Xen), which undoes a
flip; a slot that is the same in both threads keeps whatever it holds, flipped
or not. Rewrites are counted (``tls_reloads``). A new thread's TLS descriptor
(CLONE_SETTLS) is installed in its TLS array before the thread can be
scheduled at all: it never runs with a descriptor the policy has not shaped.

Limits: a run starts at most ``max_processes`` processes and has at most
``max_live`` alive at once (fork fails with EAGAIN beyond it); exceeding the
total stops the run with a report. When the first process (init) exits, the
run ends and every process still alive is killed and listed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from tlslab.linux import errno as E
from tlslab.linux import signals as SIG
from tlslab.linux.errno import SyscallError
from tlslab.linux.pipes import PipeEnd
from tlslab.machine import layout
from tlslab.machine.memory import GuestFault

TLS_SLOTS = layout.TLS_SLOTS
DEFAULT_QUANTUM = 2_000_000   # instructions a task may run before the scheduler looks again
MAX_PROCESSES = 4096          # processes a run may start in all
MAX_LIVE = 256                # processes alive at once (fork: EAGAIN beyond)
FIRST_PID = 1000

RUNNABLE, BLOCKED, DEAD = "runnable", "blocked", "dead"


class Block(Exception):
    """Raised by a system call that must wait: the task sleeps until ``ready()`` and the call is re-run.

    A wait can also end two other ways (``Kernel._end_wait``), and the call then returns instead of
    being re-run:

    - ``deadline_ns`` (the kernel's guest clock, ``Kernel.elapsed_ns``) passes: ``on_timeout()``'s
      value, -ETIMEDOUT without one (futex, sigtimedwait; poll and select return 0);
    - a signal with a handler arrives (``interruptible``): -EINTR, unless the wait is ``restartable``
      and the handler has SA_RESTART, when the call is re-run after the handler (Linux's
      ERESTARTSYS; pause and sigsuspend are never restarted: ERESTARTNOHAND).

    ``cancel()`` undoes the wait's registration (a futex waiter) when it ends without ``ready()``.
    """

    def __init__(self, what: str, ready: Callable[[], bool], interruptible: bool = True,
                 deadline_ns: int | None = None, on_timeout: Callable[[], int] | None = None,
                 restartable: bool = True, cancel: Callable[[], None] | None = None):
        super().__init__(what)
        self.what = what
        self.ready = ready
        self.interruptible = interruptible
        self.deadline_ns = deadline_ns
        self.on_timeout = on_timeout
        self.restartable = restartable
        self.cancel = cancel


class TooManyProcesses(RuntimeError):
    """The run started more processes than its limit (a fork bomb?)."""


@dataclass(eq=False)
class Task:
    """A thread: what the CPU needs to resume it, and what it waits for."""

    tid: int
    process: object                                      # its Process (thread group)
    tls: dict[int, object | None] = field(default_factory=dict)  # its own TLS array, as the guest asked
    context: object | None = None                        # saved registers while another task runs
    state: str = RUNNABLE
    waiting: Block | None = None
    clear_child_tid: int = 0
    robust_list: int = 0
    sigmask: int = 0
    saved_sigmask: int | None = None                     # sigsuspend: the mask a handler's frame restores
    altstack: tuple[int, int] | None = None              # sigaltstack: (base, size) of the alternate stack
    pending: list[int] = field(default_factory=list)     # signals directed at this thread
    instructions: int = 0                                # retired while this task was on the CPU
    faults: int = 0                                      # segment faults its instructions took
    mark: int = 0                                        # its vCPU's instruction count when it was switched in
    switches_in: int = 0
    exit_code: int | None = None
    fifo_open: object | None = None                      # a FIFO open waiting for its partner (re-run)

    def describe(self) -> str:
        return f"tid {self.tid} ({self.state}{': ' + self.waiting.what if self.waiting else ''})"


@dataclass
class ProcessRecord:
    """One line of a run's process listing (deterministic)."""

    pid: int
    ppid: int
    program: str
    argv: list[str]
    threads: int
    instructions: int
    faults: int
    tls_reloads: int
    exit_status: int | None
    exit_signal: int
    killed_at_end: bool = False
    thread_list: list = field(default_factory=list)   # per thread: tid, instructions, faults, switches in


class Kernel:
    """Owns every task and process of a run; the hypervisor's run loop asks it what runs next."""

    def __init__(self, init, new_vcpu: Callable[[], object], shape: Callable, quantum: int = DEFAULT_QUANTUM,
                 max_processes: int = MAX_PROCESSES, max_live: int = MAX_LIVE):
        self.new_vcpu = new_vcpu          # a fresh VCpu for a new address space (fork, exec)
        self.shape = shape                # the hypervisor's descriptor policy (truncation under Xen)
        self.quantum = quantum
        self.slice_end: int | None = None   # the running task's time slice ends at this instruction count
        self.max_processes, self.max_live = max_processes, max_live
        self.next_id = FIRST_PID
        self.tasks: list[Task] = []       # every task ever created, in creation order
        self.runq: list[Task] = []        # the tasks still alive, in creation order = scheduling order
        self._resume_pos = 0              # where to go on after a task that died on the CPU
        self.live: list = []              # processes still alive (the run's pipes and vCPUs are theirs)
        self.processes: list = []         # every process ever started, in order
        self.retired_instructions = 0     # of address spaces that were replaced or ended
        self.slept_ns = 0
        self.tls_reloads = 0
        self.switches = 0
        self.futex_waiters: dict[tuple[int, int], list[tuple[Task, int]]] = {}
        self.alarms: dict[object, tuple[int, int]] = {}   # process -> (expiry, interval) of its ITIMER_REAL
        self.init = init
        self.current: Task | None = None
        self.gdt_owner: Task | None = None  # whose TLS array the CPU's TLS slots were last loaded for
        self.finished = False
        self.yield_requested = False
        self.run_next: Task | None = None  # a task woken by the running one, to run next
        self.end_reason = ""
        self.killed_at_end: list[int] = []
        self.on_new_address_space: list[Callable] = []  # hypervisor hooks (strategies' per-process state)
        # observers of every TLS slot a switch loads: hook(task, slot, how, descriptor, source process) with
        # how "reload" (the task's own TLS, shaped), "carry" (the CPU's content, from the source process's
        # vCPU) or "keep" (the previous owner's vCPU is gone: the task's own last content); observes only
        self.on_tls_load: list[Callable] = []
        # hypervisor hooks run once a switch has loaded a task's TLS slots: hook(task); they may act
        # (the rewrite ABI's %fs twin follows the running thread's %gs)
        self.after_tls_load: list[Callable] = []
        self._retired_machine = {"segment_loads": 0, "page_faults": 0, "violations": {}, "segments": {}}
        self._retired_sites: dict[tuple, dict] = {}
        self.object_maps: dict[str, object] = {}  # program -> its last address space's file mappings (naming)
        self._adopt(init, parent=None)
        task = self._new_task(init)
        self.current = self.gdt_owner = task

    # ------------------------------------------------------------ bookkeeping
    def _alloc_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _adopt(self, process, parent) -> None:
        if len(self.processes) >= self.max_processes:
            raise TooManyProcesses(f"more than {self.max_processes} processes started")
        process.kernel = self
        process.pid = self._alloc_id() if self.processes else FIRST_PID
        if not self.processes:
            self.next_id = FIRST_PID + 1
        process.ppid = parent.pid if parent is not None else FIRST_PID - 1
        if parent is None:   # started by a parent outside the run (pid 999): in its group and session
            process.pgid = process.sid = process.ppid
        process.parent = parent
        process.children = []
        process.threads = []
        process.alive = True
        process.zombie = False
        process.reaped = False
        process.faults = 0
        process.tls_reloads = 0
        process.retired = 0
        if parent is not None:
            parent.children.append(process)
        self.processes.append(process)
        self.live.append(process)

    def _new_task(self, process, tid: int | None = None) -> Task:
        task = Task(tid if tid is not None else process.pid, process)
        process.threads.append(task)
        self.tasks.append(task)
        self.runq.append(task)
        process.task = task
        return task

    def live_processes(self) -> list:
        return list(self.live)

    def total_instructions(self) -> int:
        live = sum(v.counters.instructions for _p, v in self._live_vcpus())
        return self.retired_instructions + live

    def elapsed_ns(self) -> int:
        """The guest clock: 1 ns per instruction retired by any task, plus time slept."""
        return self.total_instructions() + self.slept_ns

    # ------------------------------------------------------------ scheduling
    def _ready(self, task: Task) -> bool:
        if task.state == RUNNABLE:
            return True
        if task.state == BLOCKED:
            w = task.waiting
            if w is not None and w.ready():
                return True
            if w is not None and w.interruptible and self._deliverable(task) is not None:
                return True
            if w is not None and w.deadline_ns is not None and self.elapsed_ns() >= w.deadline_ns:
                return True
        return False

    def schedule(self, force: bool = False) -> bool:
        """Make the first ready task after the current one current; False when none is ready.

        When every task waits and some wait has a deadline (or a process an alarm), guest time jumps
        to the earliest one, as an idle machine's clock runs on until a timer fires.
        """
        cur = self.current
        if cur is not None and cur.state == RUNNABLE and not force:
            return True
        while True:
            order = self.runq
            preferred, self.run_next = self.run_next, None
            if preferred is not None and preferred in order and self._ready(preferred):
                self._start(preferred)
                return True
            start = order.index(cur) + 1 if cur in order else min(self._resume_pos, len(order))
            for task in order[start:] + order[:start]:
                if self._ready(task):
                    self._start(task)
                    return True
            if not self._idle_until_next_timer():
                return False

    def _start(self, task: Task) -> None:
        """Switch to a ready task; a wait that ended without ``ready()`` returns from its call here."""
        blocked = task.waiting if task.state == BLOCKED else None
        if blocked is not None:
            task.state, task.waiting = RUNNABLE, None
        self.switch_to(task)
        if blocked is not None:
            self._end_wait(task, blocked)

    def _end_wait(self, task: Task, blocked: Block) -> None:
        if blocked.ready():
            return   # EIP is at the int $0x80: the call runs again and completes
        if blocked.cancel is not None:
            blocked.cancel()
        found = self._deliverable(task) if blocked.interruptible else None
        if found is not None:
            action = task.process.sigaction(found[0])
            if blocked.restartable and action.flags & SIG.SA_RESTART and action.handler not in (
                    SIG.SIG_DFL, SIG.SIG_IGN):
                return   # re-run after the handler
            result = -E.EINTR
        elif blocked.deadline_ns is not None and self.elapsed_ns() >= blocked.deadline_ns:
            result = blocked.on_timeout() if blocked.on_timeout is not None else -E.ETIMEDOUT
        else:
            return   # woken for a shared signal another thread took first: the call runs again
        regs = task.process.vcpu.regs
        regs.set("eip", regs.get("eip") + 2)
        regs.set("eax", result & 0xFFFFFFFF)

    def next_timer_ns(self) -> int | None:
        """The earliest pending wait deadline or alarm on the guest clock (None: none)."""
        times = [t.waiting.deadline_ns for t in self.runq
                 if t.state == BLOCKED and t.waiting is not None and t.waiting.deadline_ns is not None]
        times += [when for when, _interval in self.alarms.values()]
        return min(times) if times else None

    def set_alarm(self, process, value_ns: int, interval_ns: int) -> None:
        """Arm (value_ns > 0: that far from now, then every interval_ns if > 0) or disarm (0) the
        process's ITIMER_REAL."""
        if value_ns:
            self.alarms[process] = (self.elapsed_ns() + value_ns, interval_ns)
        else:
            self.alarms.pop(process, None)

    def _idle_until_next_timer(self) -> bool:
        """Nothing can run: let guest time pass to the next deadline or alarm (False: there is none)."""
        when = self.next_timer_ns()
        if when is None:
            return False
        now = self.elapsed_ns()
        if when > now:
            self.slept_ns += when - now
        self.fire_alarms()
        if any(self._ready(t) for t in self.runq):
            return True
        # the alarms woke nobody (SIGALRM ignored or blocked, or taken by no waiter): only a wait's
        # deadline can still end this; go straight there (interval alarms catch up on the way)
        deadlines = [t.waiting.deadline_ns for t in self.runq
                     if t.state == BLOCKED and t.waiting is not None and t.waiting.deadline_ns is not None]
        if not deadlines:
            return False
        now = self.elapsed_ns()
        if min(deadlines) > now:
            self.slept_ns += min(deadlines) - now
        self.fire_alarms()
        return True

    def fire_alarms(self) -> None:
        """SIGALRM to every process whose ITIMER_REAL expired by now (setitimer, alarm); re-arm intervals."""
        if not self.alarms:
            return
        now = self.elapsed_ns()
        for q, (when, interval) in list(self.alarms.items()):
            if when > now:
                continue
            if not q.alive:
                del self.alarms[q]
                continue
            if interval:
                self.alarms[q] = (when + ((now - when) // interval + 1) * interval, interval)
            else:
                del self.alarms[q]
            self.send_signal(q, SIG.SIGALRM)

    def preempt(self) -> None:
        """The running task used its quantum: let the next ready task run."""
        self.schedule(force=True)

    def switch_to(self, task: Task) -> None:
        prev = self.current
        if prev is task and self.gdt_owner is task:
            return
        if prev is not None and prev.state != DEAD and prev.process.alive and prev.process.vcpu is not None:
            self._account(prev)
            if prev.context is None and prev.process.task is prev:
                prev.context = prev.process.vcpu.uc.context_save()
        self.switches += 1
        self.slice_end = None
        task.switches_in += 1
        vcpu = task.process.vcpu
        task.mark = vcpu.counters.instructions
        if task.process.task is not task or task.context is not None:
            if task.context is not None:
                vcpu.load_context(task.context)
                task.context = None
        task.process.task = task
        vcpu.sign_break()   # a sign trace (hybrid's offline bound) starts a new slice here
        self._load_tls(task)
        self.current = task
        task.process.on_switch_in()

    def _load_tls(self, task: Task) -> None:
        """XenLinux's __switch_to: rewrite each TLS slot whose descriptor differs from the outgoing thread's."""
        vcpu = task.process.vcpu
        prev = self.gdt_owner
        carried = prev.process.vcpu.descriptors if prev is not None and prev.process.vcpu is not None else None
        for slot in TLS_SLOTS:
            want = task.tls.get(slot)
            before = prev.tls.get(slot) if prev is not None else None
            if prev is None or want != before:
                installed, how = (self.shape(want) if want is not None else None), "reload"
                if prev is not None:
                    self.tls_reloads += 1
                    task.process.tls_reloads += 1
            elif carried is not None:
                installed, how = carried[slot], "carry"
            else:
                installed, how = vcpu.descriptors[slot], "keep"
            if vcpu.descriptors[slot] != installed:
                vcpu.set_descriptor(slot, installed)
            for hook in self.on_tls_load:
                hook(task, slot, how, installed, prev.process if how == "carry" else None)
        self.gdt_owner = task
        for hook in self.after_tls_load:
            hook(task)

    def block(self, task: Task, blocked: Block) -> None:
        """``task``'s system call must wait: re-run its ``int $0x80`` when ``blocked.ready()``."""
        regs = task.process.vcpu.regs
        regs.set("eip", regs.get("eip") - 2)
        task.state = BLOCKED
        task.waiting = blocked

    def budget(self, now: int) -> int | None:
        """Instructions left of the running task's time slice at instruction count ``now`` (None: no
        other task is ready, so no limit).

        A slice starts when another task is ready and lasts ``quantum`` guest
        instructions across every exit (system calls, faults) until the task
        is switched out: how the hypervisor handles a fault must not change
        the schedule, so strategies are compared on the same interleaving.
        """
        alarm = self._next_alarm_in()
        if not self.others_ready():
            self.slice_end = None
            return alarm
        if self.slice_end is None:
            self.slice_end = now + self.quantum
        left = self.slice_end - now
        return left if alarm is None else min(left, alarm)

    def _next_alarm_in(self) -> int | None:
        """Guest instructions until the next alarm (1 ns each on the guest clock): the running task
        stops there so that SIGALRM arrives on time. None: no alarm set."""
        if not self.alarms:
            return None
        return max(0, min(when for when, _interval in self.alarms.values()) - self.elapsed_ns())

    def others_ready(self) -> bool:
        """Is a task other than the running one ready (so the running one gets a quantum)?"""
        cur = self.current
        return any(t is not cur and self._ready(t) for t in self.runq)

    def any_ready(self) -> bool:
        return any(self._ready(t) for t in self.runq)

    def deadlock_report(self) -> str:
        waiting = [f"pid {t.process.pid} {t.describe()}" for t in self.runq if t.state == BLOCKED]
        return "every task is blocked: " + "; ".join(waiting[:8])

    # ------------------------------------------------------------ creation
    def fork(self, parent_task: Task, child_stack: int = 0) -> object:
        """A new process: a copy of the parent's address space, descriptor table and registers."""
        parent = parent_task.process
        if len(self.live_processes()) >= self.max_live:
            raise SyscallError(E.EAGAIN, "too many live processes")
        vcpu = self.new_vcpu()
        child = parent.fork_into(vcpu)
        self._adopt(child, parent)
        task = self._new_task(child)
        task.tls = dict(parent_task.tls)
        task.sigmask = parent_task.sigmask
        task.altstack = parent_task.altstack   # fork keeps the forking thread's alternate stack
        context = parent.vcpu.uc.context_save()
        vcpu.load_context(context)
        for slot in TLS_SLOTS:  # the child's CPU state starts as the parent's
            vcpu.set_descriptor(slot, parent.vcpu.descriptors[slot])
        vcpu.regs.set("eax", 0)
        if child_stack:
            vcpu.regs.set("esp", child_stack)
        task.context = vcpu.uc.context_save()
        for hook in self.on_new_address_space:
            hook(child, "fork")
        return child

    def clone_thread(self, parent_task: Task, child_stack: int, tls_desc) -> Task:
        """A new thread of the same process; its TLS array is complete before it can run."""
        process = parent_task.process
        tid = self._alloc_id()
        task = Task(tid, process)
        task.tls = dict(parent_task.tls)
        if tls_desc is not None:
            slot, requested = tls_desc
            task.tls[slot] = requested
        task.sigmask = parent_task.sigmask
        vcpu = process.vcpu
        saved = vcpu.uc.context_save()
        vcpu.regs.set("eax", 0)
        if child_stack:
            vcpu.regs.set("esp", child_stack)
        task.context = vcpu.uc.context_save()
        vcpu.load_context(saved)
        process.threads.append(task)
        self.tasks.append(task)
        self.runq.append(task)
        return task

    def exec_image(self, task: Task, load: Callable[[object], None]) -> None:
        """execve: a fresh address space for ``task``'s process; other threads end; handlers reset."""
        process = task.process
        for other in list(process.threads):
            if other is not task:
                self._end_task(other)
        old = process.vcpu
        left = None if self.slice_end is None else self.slice_end - old.instructions_retired()
        self._account(task)
        self._retire_vcpu(process, old)
        vcpu = self.new_vcpu()
        load(vcpu)
        if left is not None:   # the time slice goes on, on the new image's instruction clock
            self.slice_end = process.vcpu.instructions_retired() + left
        task.context = None
        task.tls = {}
        task.altstack, task.saved_sigmask = None, None   # not kept across execve
        task.mark = process.vcpu.counters.instructions
        process.task = task
        self.gdt_owner = None if self.gdt_owner is task else self.gdt_owner
        self._load_tls(task)
        self.gdt_owner = task
        for hook in self.on_new_address_space:
            hook(process, "exec")

    # ------------------------------------------------------------ ending
    @staticmethod
    def _account(task: Task) -> None:
        """Credit ``task`` with the instructions its vCPU retired since it was switched in."""
        vcpu = task.process.vcpu
        if vcpu is not None:
            now = vcpu.counters.instructions
            task.instructions += max(0, now - task.mark)
            task.mark = now

    def _end_task(self, task: Task) -> None:
        if task.state == DEAD:
            return
        if task is self.current or task.process.task is task:
            self._account(task)
        task.state = DEAD
        if task.waiting is not None and task.waiting.cancel is not None:
            task.waiting.cancel()   # a wait that registered itself (a futex waiter, a FIFO opener) ends too
        task.waiting = None
        if task in self.runq:
            pos = self.runq.index(task)
            self.runq.pop(pos)
            if task is self.current:
                self._resume_pos = pos
        p = task.process
        if task.clear_child_tid and p.alive and p.vcpu is not None:
            try:
                p.mem.write_u32(task.clear_child_tid, 0)
            except Exception:  # noqa: BLE001 - an unmapped address: Linux ignores the fault too
                pass
            self.futex_wake(p, task.clear_child_tid, 1)
        if self.gdt_owner is task:
            pass  # the CPU's slots keep what they hold until the next switch compares against it

    def exit_thread(self, task: Task, status: int) -> None:
        """exit(2): this thread ends; the process ends with its last thread."""
        self._end_task(task)
        if all(t.state == DEAD for t in task.process.threads):
            self.exit_process(task.process, status, 0)

    def exit_process(self, process, status: int, signal: int, crash=None) -> None:
        """exit_group or a fatal signal: every thread ends, the process becomes a zombie."""
        if not process.alive:
            return
        for t in process.threads:
            self._end_task(t)
        process.exit_status = None if signal else status & 0xFF
        process.exit_signal = signal
        process.crash = crash
        process.alive = False
        process.zombie = True
        self.alarms.pop(process, None)
        if process in self.live:
            self.live.remove(process)
        self._retire_vcpu(process, process.vcpu, keep=process is self.init)
        process.close_all_files()
        init = self.init
        for child in process.children:
            if process is not init:
                child.ppid = init.pid
                child.parent = init
                init.children.append(child)
        parent = process.parent
        if process is init:
            self.finished = True
            self.end_reason = "init exited"
            for p in self.live_processes():
                self.killed_at_end.append(p.pid)
                self.exit_process(p, 0, SIG.SIGKILL)
            return
        if parent is not None and parent.alive:
            code = SIG.CLD_KILLED if signal else SIG.CLD_EXITED
            info = SIG.siginfo(SIG.SIGCHLD, code, process.pid, process.vfs.uid, signal or status & 0xFF)
            self.send_signal(parent, SIG.SIGCHLD, info)

    def stop_all(self) -> None:
        """The run is abandoned (timeout, limit, deadlock): every live process is killed and listed."""
        self.end_reason = self.end_reason or "stopped"
        for p in self.live_processes():
            self.killed_at_end.append(p.pid)
            self.exit_process(p, 0, SIG.SIGKILL)
        self.finished = True

    def wait_status(self, process) -> int:
        if process.exit_signal:
            return process.exit_signal & 0x7F
        return (process.exit_status & 0xFF) << 8

    # ------------------------------------------------------------ machine counters
    def _retire_vcpu(self, process, vcpu, keep: bool = False) -> None:
        """An address space ends (exit, exec): fold its counters into the run's; free it unless ``keep``."""
        self.object_maps[os.fsdecode(process.guest_path)] = process.objects
        n = vcpu.counters.instructions
        self.retired_instructions += n
        process.retired += n
        self._fold(process, vcpu, self._retired_machine, self._retired_sites)
        vcpu.retired = True
        if not keep:
            process.vcpu = None
            process.mem = None
            vcpu.release()

    @staticmethod
    def _fold(process, vcpu, machine: dict, sites: dict) -> None:
        c = vcpu.counters
        machine["segment_loads"] += c.segment_loads
        machine["page_faults"] += c.page_faults
        for seg, n in c.violations.items():
            machine["violations"][seg] = machine["violations"].get(seg, 0) + n
        for seg, sc in vcpu.segment_counters().items():
            acc = machine["segments"].setdefault(seg, {"accesses": 0, "negative": 0, "positive": 0,
                                                       "sign_changes": 0})
            for key in acc:
                acc[key] += getattr(sc, key)
        program = os.fsdecode(process.guest_path)
        for site in vcpu.site_counters():
            d = dataclasses.asdict(site)
            key = (program, d["eip"], d["segment"])
            acc = sites.get(key)
            if acc is None:
                sites[key] = d
                continue
            for name in ("accesses", "reads", "writes", "negative", "positive", "violations"):
                acc[name] += d[name]
            acc["min_offset"] = min(acc["min_offset"], d["min_offset"])
            acc["max_offset"] = max(acc["max_offset"], d["max_offset"])

    def _live_vcpus(self):
        for p in self.processes if self.init not in self.live else self.live:
            if p.vcpu is not None and not getattr(p.vcpu, "retired", False):
                yield p, p.vcpu

    def machine_totals(self) -> dict:
        machine = {"segment_loads": self._retired_machine["segment_loads"],
                   "page_faults": self._retired_machine["page_faults"],
                   "violations": dict(self._retired_machine["violations"]),
                   "segments": {k: dict(v) for k, v in self._retired_machine["segments"].items()}}
        for p, vcpu in self._live_vcpus():
            self._fold(p, vcpu, machine, {})
        return machine

    def objects_of(self, program: str | None):
        """The file mappings to name a site of ``program`` with (live process first, else the last one seen)."""
        for p in self.processes:
            if p.alive and program is not None and os.fsdecode(p.guest_path) == program:
                return p.objects
        return self.object_maps.get(program) if program is not None else None

    def merged_sites(self) -> list[dict]:
        """Site counters of every address space, merged per (program, eip, segment)."""
        sites = {k: dict(v) for k, v in self._retired_sites.items()}
        for p, vcpu in self._live_vcpus():
            self._fold(p, vcpu, {"segment_loads": 0, "page_faults": 0, "violations": {}, "segments": {}}, sites)
        programs = {key[0] for key in sites}
        out = []
        for (program, _eip, _seg), d in sites.items():
            if len(programs) > 1:
                d["program"] = program
            out.append(d)
        return out

    # ------------------------------------------------------------ signals
    def send_signal(self, process, sig: int, info: bytes | None = None, task: Task | None = None) -> None:
        """Queue ``sig`` (or apply its default action now if that is to ignore it)."""
        if not process.alive or sig == 0:
            return
        action = process.sigaction(sig)
        if action.handler == SIG.SIG_IGN or (action.handler == SIG.SIG_DFL and not SIG.default_terminates(sig)):
            if sig != SIG.SIGKILL:
                return
        if sig == SIG.SIGKILL:
            self.exit_process(process, 0, SIG.SIGKILL)
            return
        # thread-directed (tgkill, a fault): that thread's queue; process-directed (kill, alarms,
        # SIGCHLD): the process's shared queue, taken by the first of its threads that does not
        # block it, or by a thread's sigwait (Linux's shared_pending)
        queue = task.pending if task is not None else process.shared_pending
        if sig not in [s for s, _ in queue]:
            queue.append((sig, info or SIG.siginfo(sig)))

    def fault_signal(self, task: Task, sig: int, code: int, address: int) -> bool:
        """The task's own instruction faulted (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP): queue the
        signal first, with si_code and si_addr, for its handler, which runs with EIP at the faulting
        instruction. False where Linux's force_sig_fault kills instead: no handler, or the signal
        blocked or ignored."""
        action = task.process.sigaction(sig)
        if action.handler in (SIG.SIG_DFL, SIG.SIG_IGN) or task.sigmask & SIG.bit(sig):
            return False
        task.pending.insert(0, (sig, SIG.siginfo(sig, code, address)))
        return True

    def signal_pending_for(self, task: Task) -> bool:
        """Would a signal be delivered to ``task`` on its way back to user mode?"""
        return self._deliverable(task) is not None

    def _deliverable(self, task: Task):
        found = self._find_deliverable(task)
        return found[0] if found is not None else None

    def _find_deliverable(self, task: Task):
        """The next signal ``task`` takes on its way to user mode, and the queue it is in: its own
        first, then its process's shared queue."""
        for queue in (task.pending, task.process.shared_pending):
            for entry in queue:
                if not task.sigmask & SIG.bit(entry[0]) or entry[0] in (SIG.SIGKILL, SIG.SIGSEGV):
                    return entry, queue
        return None

    def deliver_signals(self, task: Task) -> None:
        """Before ``task`` returns to user mode: run the default action or enter a handler."""
        p = task.process
        while p.alive and task.state != DEAD:
            hit = self._find_deliverable(task)
            if hit is None:
                if task.saved_sigmask is not None and task.state == RUNNABLE:
                    # sigsuspend ended without a handler frame to restore its caller's mask: now
                    task.sigmask, task.saved_sigmask = task.saved_sigmask, None
                return
            found, queue = hit
            queue.remove(found)
            sig, info = found
            action = p.sigaction(sig)
            if action.handler == SIG.SIG_IGN:
                continue
            if action.handler == SIG.SIG_DFL:
                if SIG.default_terminates(sig):
                    self.exit_process(p, 0, sig)
                    return
                continue
            if task.state == BLOCKED:
                task.state, task.waiting = RUNNABLE, None
                regs = p.vcpu.regs
                if action.flags & SIG.SA_RESTART:
                    pass  # EIP is at the int $0x80: the call is re-run after the handler
                else:
                    regs.set("eip", regs.get("eip") + 2)
                    regs.set("eax", -E.EINTR & 0xFFFFFFFF)
            oldmask = task.sigmask if task.saved_sigmask is None else task.saved_sigmask
            task.saved_sigmask = None   # sigsuspend's temporary mask ends with this handler's frame
            try:
                SIG.setup_frame(p.mem, p.vcpu.regs, sig, action, oldmask, info, task.altstack)
            except GuestFault:   # no room for the frame (a bad stack pointer or sigaltstack): SIGSEGV, fatal
                self.exit_process(p, 0, SIG.SIGSEGV)
                return
            task.sigmask |= action.mask | (0 if action.flags & SIG.SA_NODEFER else SIG.bit(sig))
            task.sigmask &= ~SIG.UNBLOCKABLE
            if action.flags & SIG.SA_RESETHAND:
                p.sigactions.pop(sig, None)
            p.counters.signals_delivered += 1
            return  # one frame at a time: the handler runs first

    # ------------------------------------------------------------ futexes
    def futex_key(self, process, addr: int) -> tuple[int, int]:
        return (id(process.vcpu), addr)

    def futex_wait(self, task: Task, addr: int, bitset: int, deadline_ns: int | None = None) -> Block:
        key = self.futex_key(task.process, addr)
        entry = [task, bitset, False]
        self.futex_waiters.setdefault(key, []).append(entry)

        def cancel() -> None:   # wherever a requeue moved it
            for waiters in self.futex_waiters.values():
                for i, e in enumerate(waiters):
                    if e is entry:
                        del waiters[i]
                        return

        # a timed wait is not restarted after a handler (Linux: ERESTART_RESTARTBLOCK, EINTR to glibc)
        return Block(f"futex {addr:#x}", lambda: entry[2], deadline_ns=deadline_ns, cancel=cancel,
                     restartable=deadline_ns is None)

    def futex_wake(self, process, addr: int, n: int, bitset: int = 0xFFFFFFFF) -> int:
        key = self.futex_key(process, addr)
        waiters = self.futex_waiters.get(key, [])
        woken = 0
        for entry in list(waiters):
            if woken >= n:
                break
            task, mask, done = entry
            if done or task.state == DEAD or not mask & bitset:
                continue
            entry[2] = True
            waiters.remove(entry)
            woken += 1
        return woken

    def futex_requeue(self, process, addr: int, n_wake: int, addr2: int, n_requeue: int) -> int:
        woken = self.futex_wake(process, addr, n_wake)
        src = self.futex_waiters.get(self.futex_key(process, addr), [])
        dst = self.futex_waiters.setdefault(self.futex_key(process, addr2), [])
        moved = 0
        for entry in list(src):
            if moved >= n_requeue:
                break
            src.remove(entry)
            dst.append(entry)
            moved += 1
        return woken + moved

    # ------------------------------------------------------------ pipes
    def wake_pipe_reader(self, pipe) -> bool:
        """A write woke a task blocked reading this pipe: it runs next (Linux's wakeup preemption)."""
        reader = next((t for t in self.runq if t.state == BLOCKED and t.waiting is not None
                       and getattr(t.waiting, "pipe", None) is pipe), None)
        if reader is None:
            return False
        self.yield_requested = True
        self.run_next = reader
        return True

    def pipe_ends_open(self, pipe, end: str) -> bool:
        """Does any live process hold a descriptor on this end of the pipe?"""
        nodes = pipe.nodes_of(end)
        for p in self.live:
            if any(entry.file.node in nodes for entry in p.fds.fds.values()):
                return True
        return pipe.opening(end)   # a FIFO opener waiting for the other end counts (Linux: pipe->readers)

    # ------------------------------------------------------------ reporting
    def linux_totals(self) -> dict:
        """The personality's counters summed over every process of the run (one process: its own)."""
        if len(self.processes) == 1:
            return self.init.counters.as_dict()
        total = self.init.counters.__class__()
        for p in self.processes:
            c = p.counters
            for name in ("by_name", "errors", "unsupported", "restarts"):
                getattr(total.syscalls, name).update(getattr(c.syscalls, name))
            total.set_thread_area += c.set_thread_area
            total.signals_delivered += c.signals_delivered
        return total.as_dict()

    def records(self) -> list[ProcessRecord]:
        out = []
        for p in self.processes:
            live = p.vcpu is not None and not getattr(p.vcpu, "retired", False)
            instructions = p.retired + (p.vcpu.counters.instructions if live else 0)
            out.append(ProcessRecord(
                pid=p.pid, ppid=p.ppid, program=os.fsdecode(p.guest_path), argv=[os.fsdecode(a) for a in p.argv],
                threads=len(p.threads), instructions=instructions, faults=p.faults, tls_reloads=p.tls_reloads,
                exit_status=p.exit_status, exit_signal=p.exit_signal, killed_at_end=p.pid in self.killed_at_end,
                thread_list=[{"tid": t.tid, "instructions": t.instructions, "faults": t.faults,
                              "switches_in": t.switches_in} for t in p.threads]))
        return out

    def summary(self) -> dict:
        return {"processes": len(self.processes), "threads": len(self.tasks), "switches": self.switches,
                "tls_reloads": self.tls_reloads, "killed_at_end": list(self.killed_at_end),
                "end_reason": self.end_reason,
                "listing": [dataclasses.asdict(r) for r in self.records()]}


def is_pipe(f) -> bool:
    return isinstance(f.node, PipeEnd)
