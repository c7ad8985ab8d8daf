"""The Linux i386 personality: what a static glibc program sees of Linux.

- ``elf``: load static (and static-pie) ELF32 i386 executables; ``ElfError``.
- ``stack``: the initial stack (argv, envp, auxv) as Linux lays it out.
- ``tree``, ``nodes``, ``vfs``: synthetic trees / read-only host view with a
  private write overlay, path resolution, /dev and /proc/self/exe.
- ``syscalls`` (+ ``syscalls_fs``, ``_mm``, ``_proc``): ``int $0x80`` dispatch.
- ``process``: ``Process`` ties a VCpu to all of the above (the run loop is
  the hypervisor layer's ``Domain.run``; ``run_process`` for native runs).
"""

from tlslab.linux.elf import ElfError, ElfImage, load_elf, parse_elf
from tlslab.linux.process import Process, ProcessExit, identity_policy
from tlslab.linux.tree import TREE_4K, TREE_SMALL, SyntheticTree, TreeSpec
from tlslab.linux.vfs import Vfs

__all__ = ["ElfError", "ElfImage", "load_elf", "parse_elf", "Process", "ProcessExit",
           "identity_policy", "TREE_4K", "TREE_SMALL", "SyntheticTree", "TreeSpec", "Vfs"]
