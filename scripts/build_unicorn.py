"""Build tlslab's Unicorn: the pinned 2.1.4 source, x86 only, with our patch.

Why (third_party/unicorn/README.md has the measurements): the patch (tlslab.patch) counts guest
instructions in translated code instead of a call per block (``uc_tlslab_inline_counter``), lets
stores to pages without translated code take Unicorn's fast path (stock Unicorn sends every store
of an x86 guest without paging through its slow path), memoises the guest-state restore Unicorn
does before every memory hook, and lets the victim TLB match I/O entries. tlslab uses the inline counter when the library it loads has it and
a block hook otherwise, with the same counts; the other three parts change speed only.

The source is the PyPI sdist of unicorn 2.1.4, fetched with pip (so the machine's index settings
apply) and checked against its sha256. The library goes to ``<prefix>/lib/tlslab-unicorn``
(``tlslab/__init__.py`` points the Unicorn binding there) with a BUILD.json saying what it was
built from; a second run with the same source and patch does nothing.

Needs a C compiler; cmake is taken from PATH or, if absent, installed into this Python's
environment from PyPI (pinned). Exit status 0 on success, 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCH = ROOT / "third_party" / "unicorn" / "tlslab.patch"
SOURCE_NAME = "unicorn-2.1.4.tar.gz"
SOURCE_REQUIREMENT = "unicorn==2.1.4"
SOURCE_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"
CMAKE_REQUIREMENT = "cmake==3.31.6"
LIBRARY = "libunicorn.so.2"
DEFAULT_INTO = Path(sys.prefix) / "lib" / "tlslab-unicorn"


class BuildError(Exception):
    """One line for the user: what failed."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cmd: list[str], cwd: Path | None = None, log: Path | None = None) -> None:
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise BuildError(f"{' '.join(cmd[:3])} ... failed with status {result.returncode}{where}")


def fetch_source(work: Path, log: Path) -> Path:
    """The sdist, by pip from the configured index, checked against SOURCE_SHA256."""
    run([sys.executable, "-m", "pip", "download", SOURCE_REQUIREMENT, "--no-binary", ":all:", "--no-deps",
         "--quiet", "-d", str(work)], log=log)
    tarball = work / SOURCE_NAME
    if not tarball.is_file():
        raise BuildError(f"pip did not produce {SOURCE_NAME}")
    got = sha256(tarball)
    if got != SOURCE_SHA256:
        raise BuildError(f"{SOURCE_NAME} has sha256 {got}, expected {SOURCE_SHA256}")
    return tarball


def cmake_binary(log: Path) -> str:
    found = shutil.which("cmake")
    if found:
        return found
    run([sys.executable, "-m", "pip", "install", "--quiet", CMAKE_REQUIREMENT], log=log)
    candidate = Path(sys.executable).parent / "cmake"
    if not candidate.exists():
        raise BuildError(f"no cmake on PATH and {CMAKE_REQUIREMENT} did not install one")
    return str(candidate)


def build(into: Path, jobs: int, log: Path) -> dict:
    if not PATCH.is_file():
        raise BuildError(f"missing patch {PATCH}")
    wanted = {"source": SOURCE_NAME, "source_sha256": SOURCE_SHA256, "patch": PATCH.name,
              "patch_sha256": sha256(PATCH), "arch": "x86"}
    stamp = into / "BUILD.json"
    if (into / LIBRARY).is_file() and stamp.is_file():
        try:
            done = json.loads(stamp.read_text())
        except ValueError:
            done = {}
        if all(done.get(k) == v for k, v in wanted.items()):
            return done
    if shutil.which(os.environ.get("CC", "cc")) is None:
        raise BuildError("no C compiler (cc)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tlslab-unicorn-") as tmp:
        work = Path(tmp)
        tarball = fetch_source(work, log)
        with tarfile.open(tarball) as tar:
            tar.extractall(work, filter="data")
        src = work / "unicorn-2.1.4" / "src"
        run(["git", "apply", "--whitespace=nowarn", str(PATCH)], cwd=src, log=log)
        cmake = cmake_binary(log)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else ["-G", "Unix Makefiles"]
        build_dir = src / "build"
        run([cmake, "-S", str(src), "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
             "-DUNICORN_ARCH=x86", "-DUNICORN_BUILD_TESTS=OFF"], log=log)
        run([cmake, "--build", str(build_dir), "--target", "unicorn", "-j", str(jobs)], log=log)
        built = build_dir / LIBRARY
        if not built.is_file():
            raise BuildError(f"the build made no {LIBRARY}")
        into.mkdir(parents=True, exist_ok=True)
        partial = into / (LIBRARY + ".partial")
        shutil.copy2(built, partial)
        os.replace(partial, into / LIBRARY)   # never a half-written library under the real name
    record = {**wanted, "cmake": cmake, "generator": generator[1], "seconds": round(time.monotonic() - started, 1)}
    stamp.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--into", type=Path, default=DEFAULT_INTO, help=f"where the library goes (default {DEFAULT_INTO})")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs (default: all cores)")
    args = ap.parse_args(argv)
    into = args.into.resolve()
    into.mkdir(parents=True, exist_ok=True)
    log = into / "build.log"
    try:
        record = build(into, max(1, args.jobs), log)
    except BuildError as exc:
        print(f"build_unicorn: {exc}", file=sys.stderr)
        return 1
    print(f"tlslab Unicorn: {into / LIBRARY} ({record['source']} + {record['patch']}, "
          f"built in {record.get('seconds', '?')} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
