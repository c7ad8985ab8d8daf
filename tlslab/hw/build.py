"""Compile the ptrace supervisor on first use, into a cache keyed by its source hash.

The supervisor is the C files of ``tlslab/hw/supervisor/`` compiled together
with the shared x86 core (``tlslab/x86/_core.c``, its header on the include
path): the core decodes, checks and emulates, as it does for the model. The
hash covers every ``.c`` and ``.h`` file of the supervisor (names and contents,
in sorted order), the core's ``.c`` and ``.h``, and the flags, so a change to
any of them rebuilds.
``$TLSLAB_CACHE`` (default ``~/.cache/tlslab``) / ``hw`` / ``supervisor-<hash>``:
plain 64-bit ``cc -O2`` (``$CC`` overrides ``cc``). The binary is written to a
temporary name in the same directory and renamed into place, so concurrent
first uses never see a half-written executable.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from tlslab.artifacts import user_cache_dir

SOURCE_DIR = Path(__file__).with_name("supervisor")
#: the shared x86 core, compiled into the supervisor (tlslab/x86/_core.h says what it does)
_X86 = Path(__file__).parent.parent / "x86"
#: and the walk ahead of a fault (online-lookahead), with the tables it is generated with
CORE_SOURCES = (_X86 / "_core.c", _X86 / "_core.h", _X86 / "_ahead.c", _X86 / "_ahead.h", _X86 / "_optable.h")
CFLAGS = ("-O2", "-Wall")
#: how run records name the supervisor build (``source_record``). Records made before the
#: supervisor became a directory say "supervisor.c sha256 <hash>": the hash of that one file.
SOURCE_LABEL = "supervisor sources sha256"


class BuildError(RuntimeError):
    """The supervisor cannot be built here (one-line reason)."""


def cache_dir() -> Path:
    return user_cache_dir() / "hw"


def compiler() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise BuildError(f"no C compiler ({cc!r} not on PATH): the hw backend compiles its supervisor with it")
    return path


def sources() -> list[Path]:
    """Every source file and header of the supervisor's own directory, sorted by name."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def build_inputs() -> list[Path]:
    """Everything the supervisor binary is built from: its own sources, then the core's."""
    return [*sources(), *CORE_SOURCES]


def package_files() -> list[str]:
    """build_inputs() as paths inside the tlslab package ("hw/supervisor/main.c", "x86/_core.c")."""
    return [f"{p.parent.parent.name}/{p.parent.name}/{p.name}" if p.parent == SOURCE_DIR
            else f"{p.parent.name}/{p.name}" for p in build_inputs()]


def source_hash() -> str:
    h = hashlib.sha256()
    for path in build_inputs():
        h.update(f"{path.parent.name}/{path.name}".encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def source_record() -> str:
    """The supervisor build, as run records name it: "supervisor sources sha256 <hash>"."""
    return f"{SOURCE_LABEL} {source_hash()}"


def supervisor_path(rebuild: bool = False) -> Path:
    """Path of the compiled supervisor for the current source (built if needed)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise BuildError(f"the hw backend needs Linux on x86-64 (this is {platform.system()} {platform.machine()})")
    out = cache_dir() / f"supervisor-{source_hash()}"
    if out.is_file() and os.access(out, os.X_OK) and not rebuild:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".supervisor-", dir=out.parent)
    os.close(fd)
    try:
        c_files = [str(p) for p in build_inputs() if p.suffix == ".c"]
        cmd = [compiler(), *CFLAGS, f"-I{CORE_SOURCES[0].parent}", "-o", tmp, *c_files]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"compiling {SOURCE_DIR.name}/ failed: {' '.join(cmd)}\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
