"""The ``hw`` backend: real static i386 programs on this host's CPU under a ptrace supervisor.

The supervisor (the C files of ``supervisor/``, one concern each; compiled on first use by
:mod:`tlslab.hw.build`)
re-installs the guest's TLS descriptor truncated below the hypervisor start
(PTRACE_SET_THREAD_AREA, same arithmetic as :mod:`tlslab.x86.xen`) and answers
the real #GP (SIGSEGV) stops with emulate, flip, or the online strategies
online-site and online-probe (the model's rules, same decisions; online-rate is
model-only: ``backend.MODEL_ONLY``). :func:`run_hw` is the entry
point; :mod:`tlslab.hw.calibrate` measures per-fault costs on this host.
"""

from tlslab.hw.backend import HW_STRATEGIES, STDOUT_MODES, HwError, HwResult, HwUnavailable, run_hw, run_spec

__all__ = ["HW_STRATEGIES", "STDOUT_MODES", "HwError", "HwResult", "HwUnavailable", "run_hw", "run_spec"]
