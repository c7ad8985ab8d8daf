"""The ``hw`` backend: real static i386 programs on this host's CPU under a ptrace supervisor.

The supervisor (the C files of ``supervisor/``, one concern each, compiled on first use by
:mod:`tlslab.hw.build` together with the shared x86 core ``tlslab/x86/_core.c``, which
does its truncation, flip check, decoding and emulation exactly as for the model)
re-installs the guest's TLS descriptor truncated below the hypervisor start
(PTRACE_SET_THREAD_AREA) and answers
the real #GP (SIGSEGV) stops with emulate, flip, or the online strategies
online-site, online-rate, online-probe, online-lookahead and online-patch (the
model's rules, same decisions; online-patch rewrites gs prefixes in private
copies of code pages, ``supervisor/patch.c``). Under
online-rate, guests see the model vCPU's ``cpuid`` (CPUID faulting,
:mod:`tlslab.machine.cpuid`), so glibc takes the model's code paths. :func:`run_hw` is the entry
point; :mod:`tlslab.hw.calibrate` measures per-fault costs on this host.
"""

from tlslab.hw.backend import HW_STRATEGIES, STDOUT_MODES, HwError, HwResult, HwUnavailable, run_hw, run_spec

__all__ = ["HW_STRATEGIES", "STDOUT_MODES", "HwError", "HwResult", "HwUnavailable", "run_hw", "run_spec"]
