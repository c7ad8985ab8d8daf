"""The registry of implemented system calls, filled by ``@syscall`` in the syscalls_* modules.

A handler is ``f(process, arg1, ...)`` taking as many raw unsigned 32-bit
arguments (ebx, ecx, edx, esi, edi, ebp) as it declares, returning the value
for eax or raising ``SyscallError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from tlslab.linux.syscall_names import SYSCALL_NUMBERS


@dataclass(frozen=True)
class Handler:
    nr: int
    name: str
    func: Callable
    nargs: int


HANDLERS: dict[int, Handler] = {}


def syscall(*names: str):
    """Register the decorated function for each Linux i386 syscall name given."""

    def register(func: Callable) -> Callable:
        nargs = len(inspect.signature(func).parameters) - 1
        for name in names:
            nr = SYSCALL_NUMBERS[name]
            if nr in HANDLERS:
                raise RuntimeError(f"syscall {name} registered twice")
            HANDLERS[nr] = Handler(nr, name, func, nargs)
        return func

    return register


def signed(x: int) -> int:
    """A raw 32-bit register value as a C ``int``/``long``."""
    return x - (1 << 32) if x & 0x80000000 else x
