"""tlslab: an x86 segment/TLS emulation lab.

Layers, data flowing one way:
  x86 (pure semantics) -> machine (vCPU, memory, enforcement) -> linux (ELF, stack,
  syscalls, filesystem) -> hypervisor (traps, descriptor policy, strategies)
  -> bench / inspect / report.
"""

__version__ = "0.1.0"
