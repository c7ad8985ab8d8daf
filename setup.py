"""Build hook: a wheel carries the checkout's ``guests/`` as ``tlslab/_guests``.

Everything else is declared in pyproject.toml. ``guests/`` stays at the top of
the checkout (``make guests`` builds it there, tests and docs name it so); a
built wheel needs it inside the package, because an installed tlslab has no
checkout around it. ``tlslab.artifacts.guests_dir`` finds the checkout's copy
first and the packaged one otherwise. Editable installs copy nothing (they run
from the checkout).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
GUESTS = HERE / "guests"
#: what a run needs, relative to guests/ (not the Makefile, manifest.py or build/ scratch)
PACKAGED = ("manifest.json", "debian.lock.json", "rootfs.lock.json", "README.md", "bin", "src", "boot")


def packaged_files() -> list[Path]:
    out: list[Path] = []
    for name in PACKAGED:
        path = GUESTS / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out.extend(p for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)
    return out


class BuildPyWithGuests(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not (GUESTS / "manifest.json").is_file():
            return
        target = Path(self.build_lib) / "tlslab" / "_guests"
        shutil.rmtree(target, ignore_errors=True)     # a stale build/ must not carry a removed guest along
        for src in packaged_files():
            dst = target / src.relative_to(GUESTS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)        # keeps the executable bits (the hw backend executes guests)


setup(cmdclass={"build_py": BuildPyWithGuests})
