"""Dispatch of Linux i386 ``int $0x80`` system calls, with counters.

Importing this module registers every handler (``syscalls_fs``, ``_mm``,
``_proc``). An unimplemented call returns ``-ENOSYS`` and is counted by name
and number, never crashing the lab.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tlslab.linux import errno as E
from tlslab.linux import syscalls_fs, syscalls_mm, syscalls_net, syscalls_proc, syscalls_task  # noqa: F401
from tlslab.linux.errno import SyscallError
from tlslab.linux.kernel import Block
from tlslab.linux.syscall_names import SYSCALL_NAMES
from tlslab.linux.syscall_table import HANDLERS, Handler
from tlslab.machine.memory import GuestFault


@dataclass
class SyscallCounters:
    by_name: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)        # "name:EFOO" -> count
    unsupported: Counter = field(default_factory=Counter)   # "name(nr)" -> count
    restarts: Counter = field(default_factory=Counter)      # calls that blocked and were re-run

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_name": dict(sorted(self.by_name.items())),
                "errors": dict(sorted(self.errors.items())), "unsupported": dict(sorted(self.unsupported.items())),
                "restarts": dict(sorted(self.restarts.items()))}


def syscall_name(nr: int) -> str:
    return SYSCALL_NAMES.get(nr, f"syscall_{nr}")


def implemented() -> list[str]:
    """Names of the implemented system calls, by number."""
    return [HANDLERS[nr].name for nr in sorted(HANDLERS)]


def dispatch(process, nr: int, args: tuple[int, ...], counters: SyscallCounters) -> int:
    """Run system call ``nr``; the value for eax (negative errno on failure).

    ``ProcessExit`` from exit/exit_group/fatal signals propagates to the caller.
    """
    handler: Handler | None = HANDLERS.get(nr)
    if handler is None:
        name = syscall_name(nr)
        counters.by_name[name] += 1
        counters.unsupported[f"{name}({nr})"] += 1
        return -E.ENOSYS & 0xFFFFFFFF
    counters.by_name[handler.name] += 1
    try:
        return handler.func(process, *args[: handler.nargs]) & 0xFFFFFFFF
    except Block:
        counters.by_name[handler.name] -= 1  # it will be re-run, and counted then
        counters.restarts[handler.name] += 1
        raise
    except SyscallError as exc:
        errno = exc.errno
    except GuestFault:
        errno = E.EFAULT
    counters.errors[f"{handler.name}:{E.NAMES.get(errno, errno)}"] += 1
    return -errno & 0xFFFFFFFF
