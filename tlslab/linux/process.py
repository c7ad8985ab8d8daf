"""A Linux i386 process on a VCpu: ELF image, stack, files, system calls, counters.

The hypervisor layer's run loop (``tlslab.hypervisor.domain``, the only one)
calls ``handle_syscall`` on SYSCALL exits. Everything a run produces is deterministic given the
binary, argv, env, filesystem and seed.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from tlslab.linux import nodes as N
from tlslab.linux.elf import ElfError, ElfImage, load_interpreter, map_image, parse_elf
from tlslab.linux.errno import SyscallError
from tlslab.linux.files import O_RDONLY, O_WRONLY, FdTable, OpenFile
from tlslab.linux.objects import ObjectMap
from tlslab.linux.kernel import Task
from tlslab.linux.pagecache import PageCache
from tlslab.linux.signals import DEFAULT_ACTION, SIG_DFL, SIG_IGN, SigAction, default_terminates
from tlslab.linux.stack import InitialStack, StackSpec, build_stack
from tlslab.linux.syscalls import SyscallCounters, dispatch, syscall_name
from tlslab.linux.syscalls_proc import GUEST_EPOCH_NS, ProcessExit, TlsInstall
from tlslab.linux.vfs import Vfs
from tlslab.machine import layout
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from tlslab.x86.descriptor import SegmentDescriptor

STACK_EXPAND = 128 << 10  # what Linux adds below the argument pages of a new stack

DEFAULT_ENV = (b"PATH=/bin:/usr/bin", b"HOME=/", b"LANG=C", b"TERM=dumb")
STDOUT_MODELS = ("pipe", "file", "null", "tty")
_STREAM_MODES = {"pipe": N.S_IFIFO | 0o600, "file": N.S_IFREG | 0o644, "null": N.S_IFCHR | 0o666,
                 "tty": N.S_IFCHR | 0o620}
_STREAM_RDEV = {"pipe": (0, 0), "file": (0, 0), "null": (1, 3), "tty": (136, 0)}

__all__ = ["Process", "ProcessExit", "DEFAULT_ENV", "identity_policy"]


def identity_policy(desc: SegmentDescriptor) -> SegmentDescriptor:
    """Native Linux: the descriptor the guest asked for is the one installed."""
    return desc


@dataclass
class ProcessCounters:
    syscalls: SyscallCounters = field(default_factory=SyscallCounters)
    set_thread_area: int = 0
    signals_delivered: int = 0

    def as_dict(self) -> dict:
        return {"syscalls": self.syscalls.as_dict(), "set_thread_area": self.set_thread_area,
                "signals_delivered": self.signals_delivered}


STACK_GROWTH = 64 * 1024   # the least a stack fault grows the stack by (grow_stack)


class Process:
    """One single-threaded guest process.

    ``stdout`` models what fds 1 and 2 are, which changes what glibc does
    (docs/measurements.md#glibc: a char device makes stdio call isatty, i.e. an ioctl that fails
    and writes errno): 'pipe' (S_IFIFO), 'file' (S_IFREG), 'null' (/dev/null),
    'tty' (a terminal: TCGETS succeeds, output line-buffered by glibc).
    """

    def __init__(self, vcpu, path: str | os.PathLike, argv: list | None = None, envp: list | None = None,
                 vfs: Vfs | None = None, seed: int = 0,
                 descriptor_policy: Callable[[SegmentDescriptor], SegmentDescriptor] = identity_policy,
                 stdout: str = "pipe", stream: bool = False, stdin: bytes = b"",
                 guest_path: bytes | str | None = None):
        if stdout not in STDOUT_MODELS:
            raise ValueError(f"stdout model {stdout!r} is not one of {', '.join(STDOUT_MODELS)}")
        self.vcpu = vcpu
        self.mem = vcpu.mem
        self.path = os.fspath(path)
        guest_path = guest_path or ("/bin/" + os.path.basename(self.path))
        self.guest_path = os.fsencode(guest_path)
        self.argv = [os.fsencode(a) for a in (argv if argv is not None else [self.guest_path])]
        self.envp = [os.fsencode(e) for e in (envp if envp is not None else DEFAULT_ENV)]
        self.seed = seed
        self.vfs = vfs if vfs is not None else Vfs(N.Dir(2), seed=seed)
        self.vfs.exe_path = self.guest_path
        self.vfs.clock = self.realtime_ns   # the times of files the guest creates and writes
        self._bind_exe()
        self.descriptor_policy = descriptor_policy
        self.stdout_model, self.stream = stdout, stream
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._stdin = bytes(stdin)
        self.fds = FdTable()
        self._setup_stdio()

        self.pid, self.ppid = 1000, 999
        self.pgid = self.sid = self.ppid   # process group and session (setpgid, setsid): the parent's
        self.shared_pending: list = []     # process-directed signals not yet taken by a thread (kernel)
        self.kernel = None           # set when a Kernel adopts the process (tlslab.linux.kernel)
        self.task = Task(self.pid, self)  # the thread running (or last run) in this process
        self.threads = [self.task]
        self.counters = ProcessCounters()
        self.tls_events: list[TlsInstall] = []
        # called as hook(index, requested, installed) after every set_thread_area (hypervisor ABIs)
        self.tls_hooks: list[Callable] = []
        self.page_cache = PageCache()  # which code pages are file pages (binary-rewriting hazards)
        # address ranges the hypervisor owns in this address space (rewrite-2004's fixup buffer): the
        # memory system calls refuse to map, unmap or re-protect them (EINVAL); a fork keeps them
        self.reserved: list[tuple[int, int, str]] = []
        self.objects = ObjectMap()     # which file backs which address (naming code in shared objects)
        self.interp: ElfImage | None = None
        self.sigactions: dict[int, bytes] = {}
        self.rlimits: dict[int, tuple[int, int]] = {}
        self.slept_ns = 0
        self.crash = None
        self._rng = random.Random(f"tlslab-getrandom:{seed}")
        self.image: ElfImage | None = None
        self.initial_stack: InitialStack | None = None
        self.brk_start = self.brk = 0
        self.exit_status: int | None = None
        self.exit_signal = 0

    # ------------------------------------------------------------ set-up
    def _bind_exe(self) -> None:
        """Make /proc/self/exe name this guest and read this binary."""
        link = self.vfs.root.lookup(b"proc").entries[b"self"].entries[b"exe"]
        link.target = self.guest_path
        path = self.path

        def source() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        link.magic._source = source
        link.magic._size = os.path.getsize(path) if os.path.exists(path) else 0
        link.magic.host_path = os.fsencode(path)   # execve("/proc/self/exe") runs this binary again

    def exe_node(self) -> N.File:
        """The file node the executable is read from (/proc/self/exe)."""
        return self.vfs.root.lookup(b"proc").entries[b"self"].entries[b"exe"].magic

    def _stream(self, fd: int, kind: str) -> N.Device:
        buf = self.stdout if fd == 1 else self.stderr
        host = sys.stdout if fd == 1 else sys.stderr

        def sink(data: bytes) -> None:
            buf.extend(data)
            if self.stream:
                host.buffer.write(data)
                host.flush()

        return N.Device(self.vfs.new_ino(), kind, _STREAM_MODES[kind], sink=sink, rdev=_STREAM_RDEV[kind],
                        dev=(0, 14) if kind == "pipe" else N.DEV_DEVTMPFS if kind != "file" else N.DEV_TREE,
                        uid=self.vfs.uid, gid=self.vfs.gid)

    def _setup_stdio(self) -> None:
        pos = [0]

        def read_stdin(n: int) -> bytes:
            data = self._stdin[pos[0] : pos[0] + n]
            pos[0] += len(data)
            return data

        kind = "tty" if self.stdout_model == "tty" else "pipe"
        stdin = N.Device(self.vfs.new_ino(), kind, _STREAM_MODES[kind], source=read_stdin, rdev=_STREAM_RDEV[kind])
        self.fds.install_at(0, OpenFile(stdin, O_RDONLY, b"<stdin>"))
        for fd in (1, 2):
            self.fds.install_at(fd, OpenFile(self._stream(fd, self.stdout_model), O_WRONLY, b"<stdout>"))

    def load(self) -> None:
        """Map the ELF (and its interpreter), build the stack, and enter ring 3.

        As Linux's binfmt_elf: a dynamic executable's PT_INTERP is looked up in
        the guest's own filesystem (the root the guest sees, never the host's),
        mapped top-down in the mmap area, and entered; AT_BASE tells it where it
        is, AT_PHDR/AT_ENTRY where the program is.
        """
        mem = self.mem
        data, image = parse_elf(self.path)
        map_image(mem, data, image)
        self.image = image
        exe = self.exe_node()
        self.page_cache.map_file(exe, image.segments, mem)
        self.objects.main, self.objects.main_node = image, exe
        self._note_image(image, exe, os.fsdecode(self.guest_path))
        entry, base = image.entry, 0
        if image.interp is not None:
            node = self._guest_file(image.interp, f"{self.path}: its interpreter {image.interp}")
            self.interp = load_interpreter(mem, image.interp, node.read_at(0, node.size))
            self.page_cache.map_file(node, self.interp.segments, mem)
            self._note_image(self.interp, node, image.interp)
            entry, base = self.interp.entry, self.interp.load_bias
        self.brk_start = self.brk = image.brk_start
        stack_prot = PROT_READ | PROT_WRITE | (PROT_EXEC if image.exec_stack else 0)
        mem.map(layout.STACK_TOP - layout.STACK_SIZE, layout.STACK_SIZE, stack_prot, "[stack]")
        self.stack_prot = stack_prot
        spec = StackSpec(argv=self.argv, envp=self.envp, execfn=self.guest_path,
                         random16=random.Random(f"tlslab-at-random:{self.seed}").randbytes(16),
                         phdr=image.phdr, phent=image.phent, phnum=image.phnum, entry=image.entry, base=base,
                         uid=self.vfs.uid, gid=self.vfs.gid)
        self.initial_stack = build_stack(mem, layout.STACK_TOP, spec)
        # Linux maps the pages the arguments need plus 128 KiB (fs/exec.c setup_arg_pages,
        # stack_expand) and grows the stack on faults below it up to RLIMIT_STACK: a program
        # that probes its stack (gnulib's c-stack, with mincore) sees where it really ends
        self.stack_limit = layout.STACK_TOP - layout.STACK_SIZE
        self.stack_start = max(self.stack_limit, (self.initial_stack.sp & ~(layout.PAGE_SIZE - 1)) - STACK_EXPAND)
        if self.stack_start > self.stack_limit:
            mem.unmap(self.stack_limit, self.stack_start - self.stack_limit)
        for reg in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp"):  # ELF_PLAT_INIT: edx=0 = no rtld_fini
            self.vcpu.regs.set(reg, 0)
        self.vcpu.enter_user_mode(entry, self.initial_stack.sp)

    def _guest_file(self, path: str, what: str) -> N.File:
        """A regular file of the guest's filesystem (for the loader), or one ElfError line."""
        try:
            node = self.vfs.resolve(os.fsencode(path))
        except SyscallError as exc:
            raise ElfError(f"{what} cannot be opened in the guest's root ({exc})") from None
        if not isinstance(node, N.File):
            raise ElfError(f"{what} is not a regular file in the guest's root")
        return node

    def _note_image(self, image: ElfImage, node, path: str) -> None:
        """Record the loader's file mappings of ``image`` (its PT_LOAD pages) for naming code."""
        for seg in image.segments:
            if seg.filesz:
                lo = seg.vaddr - seg.vaddr % layout.PAGE_SIZE
                self.objects.add(lo, seg.vaddr + seg.filesz - lo, seg.offset - (seg.vaddr - lo), path, node)

    # ------------------------------------------------------------ running
    def elapsed_ns(self) -> int:
        """Guest time since start: 1 ns per retired instruction (of every process), plus time slept."""
        if self.kernel is not None:
            return self.kernel.elapsed_ns()
        return self.vcpu.counters.instructions + self.slept_ns

    # -- thread state, as the system calls see it
    @property
    def tls_requested(self) -> dict:
        """The running thread's TLS array (what the guest asked for, per GDT slot)."""
        return self.task.tls

    @property
    def sigmask(self) -> int:
        return self.task.sigmask

    @sigmask.setter
    def sigmask(self, value: int) -> None:
        self.task.sigmask = value

    @property
    def clear_child_tid(self) -> int:
        return self.task.clear_child_tid

    @clear_child_tid.setter
    def clear_child_tid(self, value: int) -> None:
        self.task.clear_child_tid = value

    @property
    def robust_list(self) -> int:
        return self.task.robust_list

    @robust_list.setter
    def robust_list(self, value: int) -> None:
        self.task.robust_list = value

    def grow_stack(self, address: int) -> bool:
        """A fault at ``address`` below the stack and within RLIMIT_STACK grows it (Linux's expand_stack)."""
        start = getattr(self, "stack_start", None)
        if start is None or not self.stack_limit <= address < start:
            return False
        new_start = address & ~(layout.PAGE_SIZE - 1)
        if self.mem.is_mapped(new_start, 1) or any(r.start < start and r.end > new_start for r in self.mem.regions()):
            return False
        # grow by at least STACK_GROWTH where nothing else is mapped: a deep recursion then takes one
        # fault (and one region) per 64 KiB rather than per page; the pages are zero and, as on
        # Linux, an access anywhere down to the limit would have grown the stack to them anyway
        chunk = max(self.stack_limit, (start - STACK_GROWTH) & ~(layout.PAGE_SIZE - 1))
        if chunk < new_start and not any(r.start < new_start and r.end > chunk for r in self.mem.regions()):
            new_start = chunk
        self.mem.map(new_start, start - new_start, self.stack_prot, "[stack]")
        self.stack_start = new_start
        return True

    def realtime_ns(self) -> int:
        """CLOCK_REALTIME on the guest clock (``elapsed_ns`` after the guest epoch)."""
        return GUEST_EPOCH_NS + self.elapsed_ns()

    def sleep(self, ns: int) -> None:
        """Guest time passes (nanosleep): the one clock moves on."""
        if self.kernel is not None:
            self.kernel.slept_ns += ns
        else:
            self.slept_ns += ns

    def raise_signal(self, sig: int) -> None:
        """Send ``sig`` to the running thread (SIGPIPE on a write to a pipe with no reader)."""
        if self.kernel is not None:
            self.kernel.send_signal(self, sig, task=self.task)
            return
        action = self.sigaction(sig)
        if action.handler == SIG_DFL and default_terminates(sig):
            raise ProcessExit(128 + sig, signal=sig)

    def sigaction(self, sig: int) -> SigAction:
        raw = self.sigactions.get(sig)
        return SigAction.unpack(raw) if raw is not None else DEFAULT_ACTION

    # -- process lifetime (the kernel calls these)
    def fork_into(self, vcpu) -> Process:
        """A copy of this process on ``vcpu``: memory, descriptors, handlers, cwd (fork)."""
        child = Process.__new__(Process)
        child.__dict__.update(self.__dict__)
        child.vcpu, child.mem = vcpu, vcpu.mem
        with vcpu.mem.batched():
            for r in self.mem.regions():
                region = vcpu.mem.map(r.start, r.size, r.prot, r.name)
                region.buffer[:] = r.buffer
        child.fds = self.fds.copy()
        child.vfs = self.vfs.fork()
        child.sigactions = dict(self.sigactions)
        child.rlimits = dict(self.rlimits)
        child.counters = ProcessCounters()
        child.tls_events = []
        child.tls_hooks = list(self.tls_hooks)
        child.page_cache = self.page_cache.fork()
        child.reserved = list(self.reserved)
        child.objects = self.objects.fork()
        child._rng = random.Random()
        child._rng.setstate(self._rng.getstate())
        child.exit_status, child.exit_signal, child.crash = None, 0, None
        child.shared_pending = []   # a fork's child starts with no pending signals
        return child

    def replace_image(self, vcpu, path: str, guest_path: bytes, argv: list[bytes], envp: list[bytes]) -> None:
        """execve: this process now runs ``path`` on a fresh address space."""
        self.vcpu, self.mem = vcpu, vcpu.mem
        self.path = os.fspath(path)
        self.guest_path = guest_path
        self.argv, self.envp = list(argv), list(envp)
        self.vfs.exe_path = guest_path
        self._bind_exe()
        self.fds.close_on_exec()
        self.sigactions = {sig: raw for sig, raw in self.sigactions.items() if SigAction.unpack(raw).handler == SIG_IGN}
        self.page_cache = self.page_cache.fork(keep_mappings=False)
        self.reserved = []
        self.objects = ObjectMap()
        self.interp = None
        self.image = None
        self.load()

    def on_switch_in(self) -> None:
        """This process is about to run: /proc/self names it."""
        self._bind_exe()

    def close_all_files(self) -> None:
        self.fds.close_all()

    def release_memory(self) -> None:
        """A zombie keeps its record, not its address space."""

    def pipe_end_open(self, pipe, end: str) -> bool:
        if self.kernel is not None:
            return self.kernel.pipe_ends_open(pipe, end)
        nodes = pipe.nodes_of(end)
        return any(entry.file.node in nodes for entry in self.fds.fds.values()) or pipe.opening(end)

    def random_bytes(self, n: int) -> bytes:
        return self._rng.randbytes(n)

    def handle_syscall(self) -> None:
        """Perform the system call the running thread just made (eax and args in registers).

        A call that must wait raises ``Block`` (the kernel parks the thread and
        re-runs the call later); exit, exit_group and fatal signals end threads
        and processes through the kernel (``TaskEnded``); a process with no
        kernel raises ProcessExit instead.
        """
        regs = self.vcpu.regs.syscall_registers()
        task = self.task
        try:
            result = dispatch(self, regs[0], regs[1:], self.counters.syscalls)
        except ProcessExit as exc:
            self.exit_status, self.exit_signal = exc.status, exc.signal
            raise
        if task.state == "runnable" and self.alive_task(task):
            self.vcpu.regs.set("eax", result)

    def alive_task(self, task) -> bool:
        return getattr(self, "alive", True) and task.process is self and self.task is task

    @property
    def set_thread_area_calls(self) -> int:
        return len(self.tls_events)

    def symbolize(self, addr: int) -> str:
        """``symbol+0xN`` in the executable, ``libc.so.6:symbol+0xN`` in a shared object."""
        return self.objects.symbolize(addr)

    def summary(self) -> dict:
        """Deterministic counters of this run (identical for identical runs)."""
        self.counters.set_thread_area = len(self.tls_events)
        return {"exit_status": self.exit_status, "exit_signal": self.exit_signal,
                "instructions": self.vcpu.counters.instructions, **self.counters.as_dict(),
                "stdout_bytes": len(self.stdout), "stderr_bytes": len(self.stderr)}

    def describe_syscall(self, nr: int) -> str:
        return syscall_name(nr)
