"""tlslab: an x86 segment/TLS emulation lab.

Layers, data flowing one way:
  x86 (pure semantics) -> machine (vCPU, memory, enforcement) -> linux (ELF, stack,
  syscalls, filesystem) -> hypervisor (traps, descriptor policy, strategies)
  -> bench / inspect / report.
"""

__version__ = "0.1.0"


def _use_built_unicorn() -> None:
    """Point the Unicorn binding at tlslab's own build (scripts/build_unicorn.py), if this
    environment has one and the user has not chosen a library (LIBUNICORN_PATH). It must run before
    the binding is first imported: the binding loads its library at import. Which library was
    loaded, and how it counts instructions, is in every run record (machine.fastpath.unicorn_build)."""
    import os
    import sys
    from pathlib import Path

    built = Path(sys.prefix) / "lib" / "tlslab-unicorn"
    if "LIBUNICORN_PATH" not in os.environ and (built / "libunicorn.so.2").is_file():
        if "unicorn" in sys.modules:
            import warnings

            warnings.warn(f"unicorn was imported before tlslab, so it loaded the wheel's library, not tlslab's "
                          f"build in {built}: import tlslab first (results are the same, runs are slower)",
                          RuntimeWarning, stacklevel=3)
        os.environ["LIBUNICORN_PATH"] = str(built)


_use_built_unicorn()
