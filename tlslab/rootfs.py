"""A pinned Debian i386 root filesystem for running Debian's dynamic programs.

tlslab runs Debian's unmodified, dynamically linked i386 programs (``ld.so``,
``libc.so.6``, coreutils ``ls`` ...) from a root directory built here from
pinned ``.deb`` files. ``guests/rootfs.lock.json`` pins, per root, each
package's version, ``.deb`` file name, sha256 and size; :func:`materialise`
downloads what is missing (``apt-get download NAME:ARCH=VERSION``), verifies
every ``.deb`` against the lock, and unpacks all of them with ``dpkg-deb -x``
(no maintainer scripts, no dpkg database) into one directory.

Facts the code relies on, and where they come from (checked on a Debian 12
"bookworm" amd64 host with ``dpkg --add-architecture i386``; re-check with
``apt-cache madison``, ``dpkg-deb -f DEB Pre-Depends Depends`` and
``tlslab rootfs fetch``):

- Programs and their libraries (:data:`DEBIAN_PACKAGES`): ``coreutils`` 9.1-1
  (pre-depends on ``libacl1`` 2.3.1-3, ``libattr1`` 1:2.5.1-4, ``libgmp10``
  2:6.2.1+dfsg1-1.1, ``libselinux1`` 3.4-1+b6), ``libc6`` 2.36-9+deb12u14
  (``/lib/ld-linux.so.2``, ``libc.so.6``), ``dash`` 0.5.12-2, ``grep`` 3.8-5
  (needs ``libpcre2-8-0`` 10.42-1), ``sed`` 4.9-1+deb12u1 (``libacl1``,
  ``libselinux1``), ``findutils`` 4.9.0-4 (``libselinux1``). Versions are the
  candidates apt offered when the lock was written (the lock, not this text, is
  authoritative). The bookworm-security i386 index was unreachable then, so
  every pin comes from bookworm main/updates.
- Fillers: Keir Fraser's 2004 benchmark was ``ls -R /usr/lib`` on a real
  system, so ``/usr/lib`` must be as big and as real as a real one's (>= 5,000
  entries made by real packages, not a synthetic tree). ``python3-django``
  (Architecture: all) alone installs 5,870 entries under ``/usr/lib``;
  ``libpython3.11-minimal``/``libpython3.11-stdlib`` add a real
  ``/usr/lib/python3.11`` and i386 shared objects, ``libperl5.36`` a real
  ``/usr/lib/i386-linux-gnu/perl``, ``gcc-12-plugin-dev`` a deep header tree
  under ``/usr/lib/gcc``. All 17 packages together: 7,771 entries below
  ``usr/lib`` (``os.walk``: directories + files + symlinks, ``usr/lib``
  itself not counted; ``find usr/lib | wc -l`` says 7,772), 8,531 entries in
  the whole root, 114.6 MB of file sizes (``du``: about 122 MB) unpacked from
  18.8 MB of ``.deb`` files -- measured by ``tlslab rootfs fetch`` on the
  lock as committed; :func:`materialise` records these numbers in the stamp.
- The packages ship ``/bin``, ``/lib`` and ``/usr`` as real directories
  (bookworm's packages are not merged-/usr; the ``/lib`` -> ``usr/lib``
  symlinks come from ``usrmerge``/``base-files``, which are not unpacked), so
  ``/bin/ls`` and ``/lib/ld-linux.so.2`` exist as such. ``LC_ALL=C chroot ROOT
  /bin/ls -R /usr/lib`` runs natively on this host.

The root is read-only to guests: the model reads it through a read-only view
(``--root DIR``) and the hw backend runs guests chrooted into it as an
unprivileged user; ``dpkg-deb -x`` run as root leaves every entry owned by
root, never world-writable. Nothing ever writes into a materialised root.

Layout (``CACHE`` is ``$TLSLAB_CACHE`` or ``~/.cache/tlslab``, i.e.
``tlslab.debian.cache_root().parent``; ``cache_dir`` replaces it):

- ``CACHE/debian/<package>_<version>_<arch>/<deb>``: the ``.deb`` files (the
  same per-package directories ``tlslab fetch`` uses for busybox);
- ``CACHE/rootfs/<name>-<key>/``: the root, ``<key>`` the first 12 hex digits
  of the sha256 of the canonical JSON of the root's lock entry, so a changed
  lock gives a new directory;
- ``CACHE/rootfs/<name>-<key>.json``: the completion stamp, beside the root
  (guests list the root, so nothing of ours goes inside it), written last and
  fsync'ed. A root without its stamp is incomplete and is rebuilt.

Concurrency: each process unpacks into its own uniquely named staging
directory beside the target; installing it (rename, then stamp) happens under
an ``flock`` on ``CACHE/rootfs/.<name>-<key>.lock``; a process that finds the
stamp already there discards its staging copy.

Errors: :class:`RootfsUnavailable` (tools missing, archive unreachable, a
locked version no longer offered, or nothing cached with ``fetch=False``) is
what tests turn into a skip; :class:`RootfsMismatch` (a ``.deb`` whose sha256
differs from the lock) is an integrity failure. Both are
:class:`tlslab.guests.GuestError` with a one-line message.

Layer: beside :mod:`tlslab.debian` (whose apt/dpkg plumbing it reuses); it
must not import ``tlslab.linux``, ``tlslab.machine`` or ``tlslab.hypervisor``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tlslab import debian
from tlslab.artifacts import GuestError, guests_dir, sha256_file

# --------------------------------------------------------------------------- what is pinned

DEBIAN_PACKAGES: tuple[tuple[str, str], ...] = (
    # the programs
    ("coreutils", "i386"),
    ("dash", "i386"),
    ("findutils", "i386"),
    ("grep", "i386"),
    ("sed", "i386"),
    # the libraries they need (and ld.so)
    ("libc6", "i386"),
    ("libacl1", "i386"),
    ("libattr1", "i386"),
    ("libgmp10", "i386"),
    ("libpcre2-8-0", "i386"),
    ("libselinux1", "i386"),
    ("libgcc-s1", "i386"),
    # fillers: a real, large /usr/lib
    ("python3-django", "all"),
    ("libpython3.11-minimal", "i386"),
    ("libpython3.11-stdlib", "i386"),
    ("libperl5.36", "i386"),
    ("gcc-12-plugin-dev", "i386"),
)
"""The packages of the ``debian`` root, as ``(name, arch)``; the one list in code.

Programs: ``coreutils`` (``/bin/ls`` and friends), ``dash`` (``/bin/sh``-style
shell), ``findutils`` (``/usr/bin/find``), ``grep``, ``sed``. Libraries: every
library those programs need, found with ``dpkg-deb -f DEB Pre-Depends
Depends``: ``libc6`` (``ld-linux.so.2``, ``libc.so.6``), ``libacl1``,
``libattr1``, ``libgmp10``, ``libselinux1`` (coreutils; sed and findutils need
a subset), ``libpcre2-8-0`` (grep), and ``libgcc-s1``, which ``libc6`` itself
depends on: glibc loads ``libgcc_s.so.1`` with dlopen to unwind a thread's
stack in ``pthread_exit`` and ``pthread_cancel`` and aborts without it ("libgcc_s.so.1
must be installed for pthread_exit to work"). It installs
``/lib/i386-linux-gnu/libgcc_s.so.1`` and nothing under ``/usr/lib``.

Fillers, there only so that ``/usr/lib`` looks like a real system's (the 2004
benchmark is ``ls -R /usr/lib``; >= 5,000 entries from real packages):

- ``python3-django`` (Architecture: all): 5,870 entries under
  ``/usr/lib/python3/dist-packages`` -- the bulk of the tree, many small
  files in many directories, as in a real ``/usr/lib``;
- ``libpython3.11-minimal`` and ``libpython3.11-stdlib``: the Python standard
  library under ``/usr/lib/python3.11`` plus i386 extension modules;
- ``libperl5.36``: ``/usr/lib/i386-linux-gnu/perl`` (a real multiarch subtree
  with shared objects);
- ``gcc-12-plugin-dev``: a deep header tree under ``/usr/lib/gcc`` (depth,
  long names).

None of the fillers' programs are meant to run; their dependencies are not
unpacked.
"""

ROOTS: dict[str, dict] = {
    "debian": {"suite": "bookworm", "arch": "i386", "packages": DEBIAN_PACKAGES},
}
ROOTFS_NAMES: tuple[str, ...] = tuple(ROOTS)

FETCH_HINT = "run `tlslab rootfs fetch`"
UPDATE_HINT = ("refresh with `tlslab rootfs fetch --update-lock {name}` "
               "(then re-run the tests and commit guests/rootfs.lock.json)")


class RootfsUnavailable(GuestError):
    """apt/dpkg cannot provide the root here, or it is not fetched (tests skip on this)."""


class RootfsMismatch(GuestError):
    """A cached or downloaded .deb does not match guests/rootfs.lock.json."""


@dataclass(frozen=True)
class _Paths:
    debs: Path        # CACHE/debian
    root: Path        # CACHE/rootfs/<name>-<key>
    stamp: Path       # CACHE/rootfs/<name>-<key>.json
    flock: Path       # CACHE/rootfs/.<name>-<key>.lock


# --------------------------------------------------------------------------- lock

def lock_path() -> Path:
    return guests_dir() / "rootfs.lock.json"


def load_lock() -> dict:
    """The whole lock file (``{"roots": {}}`` if there is none yet)."""
    try:
        with open(lock_path()) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"roots": {}}
    except json.JSONDecodeError as exc:
        raise GuestError(f"{lock_path()} is not valid JSON: {exc}") from None


def _write_lock(lock: dict) -> None:
    path = lock_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_name(name: str) -> dict:
    if name not in ROOTS:
        raise GuestError(f"unknown root filesystem {name!r} (known: {', '.join(ROOTFS_NAMES)})")
    return ROOTS[name]


def lock_entry(name: str = "debian") -> dict:
    """The lock entry of root ``name``: suite, arch and the pinned packages."""
    _check_name(name)
    entry = load_lock().get("roots", {}).get(name)
    if not entry or not entry.get("packages"):
        raise RootfsUnavailable(
            f"{lock_path().name} pins no root {name!r}; create it with "
            f"`tlslab rootfs fetch --update-lock {name}`")
    return entry


def locked_packages(name: str = "debian") -> list[dict]:
    """The pinned packages of root ``name``: package, arch, version, deb, sha256, size."""
    return list(lock_entry(name)["packages"])


RECIPE = 2  # how a root is made from its .debs (2: directory times fixed); part of the directory name


def lock_key(entry: dict) -> str:
    """First 12 hex digits of the sha256 of the canonical JSON of a root's lock entry."""
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _cache_base(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else debian.cache_root().parent


def _paths(name: str, entry: dict, cache_dir: str | os.PathLike | None) -> _Paths:
    base = _cache_base(cache_dir)
    leaf = f"{name}-{lock_key(entry)}-r{RECIPE}"
    rootfs = base / "rootfs"
    return _Paths(base / "debian", rootfs / leaf, rootfs / f"{leaf}.json", rootfs / f".{leaf}.lock")


def deb_path(pkg: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cache keeps the .deb of one lock package entry."""
    debs = _cache_base(cache_dir) / "debian"
    return debian._pkgdir(debs, pkg["package"], pkg["version"], pkg["arch"]) / pkg["deb"]


def _spec(package: str, arch: str) -> str:
    """apt's name for a package: ``name:arch``, or plain ``name`` for Architecture: all."""
    return package if arch == "all" else f"{package}:{arch}"


# --------------------------------------------------------------------------- apt

@contextlib.contextmanager
def _as_rootfs_errors():
    """Re-raise tlslab.debian's errors as this module's (same one-line message)."""
    try:
        yield
    except debian.DebianMismatch as exc:
        raise RootfsMismatch(str(exc)) from None
    except debian.DebianUnavailable as exc:
        raise RootfsUnavailable(str(exc)) from None


def _prepare_apt(arch: str) -> None:
    with _as_rootfs_errors():
        debian._require_tools()
        debian._ensure_arch(arch)


def _offered(spec: str, updated: list[str]) -> list[str]:
    """Versions apt offers for ``spec``; runs ``apt-get update`` once if it knows none."""
    versions = debian._available_versions(spec)
    if not versions and not updated:
        with _as_rootfs_errors():
            updated.append(debian._apt_update() or "ok")
        versions = debian._available_versions(spec)
    return versions


def _download_locked(name: str, pkg: dict, target: Path, updated: list[str]) -> None:
    spec = _spec(pkg["package"], pkg["arch"])
    versions = debian._available_versions(spec)
    if pkg["version"] not in versions and not updated:
        with _as_rootfs_errors():
            updated.append(debian._apt_update() or "ok")
        versions = debian._available_versions(spec)
    if pkg["version"] not in versions:
        err = updated[0] if updated and updated[0] != "ok" else ""
        extra = f"; apt-get update: {err}" if err and not versions else ""
        raise RootfsUnavailable(
            f"{spec} {pkg['version']} pinned in {lock_path().name} is not offered by apt "
            f"(offered: {', '.join(versions) or 'none'}{extra}); {UPDATE_HINT.format(name=name)}")
    with _as_rootfs_errors():
        deb = debian._download(f"{spec}={pkg['version']}", target.parent)
    if deb != target:
        os.replace(deb, target)


def _verify(pkg: dict, deb: Path, name: str) -> None:
    digest = sha256_file(deb)
    if digest != pkg["sha256"]:
        raise RootfsMismatch(
            f"{deb} sha256 {digest[:16]}... != locked {pkg['sha256'][:16]}... "
            f"(delete it to re-download, or {UPDATE_HINT.format(name=name)})")


def update_lock(name: str = "debian", cache_dir: str | os.PathLike | None = None) -> dict:
    """Download the candidate version apt offers now of every package of root
    ``name`` and rewrite its entry in ``guests/rootfs.lock.json``; returns it."""
    spec_root = _check_name(name)
    suite, arch = spec_root["suite"], spec_root["arch"]
    host_suite = _host_suite()
    if host_suite and host_suite != suite:
        raise RootfsUnavailable(
            f"this host's apt is on Debian {host_suite!r}, root {name!r} is pinned to {suite!r}; "
            f"update the lock on a {suite} host")
    _prepare_apt(arch)
    debs = _cache_base(cache_dir) / "debian"
    updated: list[str] = []
    packages = []
    for package, parch in spec_root["packages"]:
        spec = _spec(package, parch)
        if not _offered(spec, updated):
            err = updated[0] if updated and updated[0] != "ok" else "check /etc/apt/sources.list"
            raise RootfsUnavailable(f"apt knows no package {spec} ({err})")
        staging = Path(tempfile.mkdtemp(dir=_mkdir(debs), prefix=".staging-"))
        try:
            with _as_rootfs_errors():
                deb = debian._download(spec, staging)
                version = debian._deb_field(deb, "Version")
                deb_arch = debian._deb_field(deb, "Architecture")
            if deb_arch != parch:
                raise GuestError(f"{deb.name} is Architecture: {deb_arch}, {name} root declares {parch}")
            final = debian._pkgdir(debs, package, version, parch) / deb.name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(deb, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        packages.append({"package": package, "arch": parch, "version": version,
                         "deb": final.name, "sha256": sha256_file(final),
                         "size": final.stat().st_size})
    entry = {"suite": suite, "arch": arch, "packages": packages}
    lock = load_lock()
    lock.setdefault("roots", {})[name] = entry
    _write_lock(lock)
    return entry


def _host_suite() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


# --------------------------------------------------------------------------- materialise

def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_stamp(paths: _Paths, key: str) -> dict | None:
    try:
        stamp = json.loads(paths.stamp.read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != key or not paths.root.is_dir():
        return None
    return stamp


def _write_stamp(path: Path, stamp: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def count_entries(top: Path) -> int:
    """Directories + files + symlinks below ``top`` (``os.walk``, symlinks not followed)."""
    total = 0
    for _dirpath, dirnames, filenames in os.walk(top):
        total += len(dirnames) + len(filenames)
    return total


def _unpacked_bytes(top: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for entry in (*dirnames, *filenames):
            total += os.lstat(os.path.join(dirpath, entry)).st_size
    return total


def _extract_all(debs: list[Path], dest: Path) -> None:
    for deb in debs:
        with _as_rootfs_errors():
            cp = debian._run(["dpkg-deb", "-x", str(deb), str(dest)])
        if cp.returncode != 0:
            raise RootfsUnavailable(f"dpkg-deb -x {deb.name} failed: {debian._last_line(cp)}")
    os.chmod(dest, 0o755)     # mkdtemp made it 0700; guests run as an unprivileged user
    _fix_directory_times(dest)


def _fix_directory_times(top: Path) -> None:
    """Give every directory the newest mtime found in the root: a function of the .debs alone.

    A directory's mtime changes whenever an entry is added to it, so after
    unpacking it would be the time of unpacking (``ls -l``, ``find -newer``
    would then differ between machines and days). Files keep their packaged
    mtimes; directories all get the newest of them.
    """
    newest = 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            newest = max(newest, os.lstat(os.path.join(dirpath, f)).st_mtime_ns)
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        os.utime(dirpath, ns=(newest, newest))


def _remove(path: Path) -> None:
    """Move ``path`` aside (atomic), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def materialise(name: str = "debian", fetch: bool = True,
                cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of root ``name``, building it if needed.

    Missing ``.deb`` files are downloaded (only with ``fetch=True``; otherwise
    :class:`RootfsUnavailable` with the hint ``run `tlslab rootfs fetch```),
    every ``.deb`` is checked against the lock's sha256 (:class:`RootfsMismatch`
    names the file), all are unpacked into a staging directory beside the
    target, which is then renamed into place and stamped (see the module
    docstring). A stamped root is returned at once.
    """
    entry = lock_entry(name)
    key = lock_key(entry)
    paths = _paths(name, entry, cache_dir)
    if _read_stamp(paths, key) is not None:
        return paths.root

    packages = entry["packages"]
    debs = [deb_path(pkg, cache_dir) for pkg in packages]
    missing = [(pkg, deb) for pkg, deb in zip(packages, debs, strict=True) if not deb.is_file()]
    if missing and not fetch:
        raise RootfsUnavailable(
            f"root {name!r} is not fetched ({len(missing)} of {len(packages)} .deb files "
            f"missing from {paths.debs}); {FETCH_HINT}")
    if missing:
        _prepare_apt(entry["arch"])
        updated: list[str] = []
        for pkg, deb in missing:
            deb.parent.mkdir(parents=True, exist_ok=True)
            _download_locked(name, pkg, deb, updated)
    for pkg, deb in zip(packages, debs, strict=True):
        _verify(pkg, deb, name)

    parent = _mkdir(paths.root.parent)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{paths.root.name}.staging-"))
    try:
        _extract_all(debs, staging)
        stamp = {
            "name": name,
            "key": key,
            "suite": entry["suite"],
            "arch": entry["arch"],
            "packages": [{k: pkg[k] for k in ("package", "arch", "version", "sha256")}
                         for pkg in packages],
            "usr_lib_entries": count_entries(staging / "usr" / "lib"),
            "entries": count_entries(staging),
            "unpacked_bytes": _unpacked_bytes(staging),
            "deb_bytes": sum(pkg["size"] for pkg in packages),
        }
        with open(paths.flock, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            if _read_stamp(paths, key) is not None:
                return paths.root          # another process finished first: ours is discarded
            _remove(paths.root)            # an unstamped leftover is incomplete
            os.replace(staging, paths.root)
            os.sync()                      # the root's contents are durable before the stamp
            _write_stamp(paths.stamp, stamp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths.root


def stamp(name: str = "debian", cache_dir: str | os.PathLike | None = None) -> dict:
    """The completion stamp of root ``name`` (materialising it from the cache, never
    downloading)."""
    materialise(name, fetch=False, cache_dir=cache_dir)
    entry = lock_entry(name)
    found = _read_stamp(_paths(name, entry, cache_dir), lock_key(entry))
    if found is None:
        raise RootfsUnavailable(f"root {name!r} lost its stamp while being read; {FETCH_HINT}")
    return found


def describe(name: str = "debian", cache_dir: str | os.PathLike | None = None) -> dict:
    """Facts about the materialised root for the CLI (never downloads).

    Keys: ``name``, ``path``, ``suite``, ``arch``, ``packages`` (list of
    ``{"package", "arch", "version"}``), ``usr_lib_entries``, ``entries``,
    ``unpacked_bytes``, ``deb_bytes``.
    """
    found = stamp(name, cache_dir)
    path = materialise(name, fetch=False, cache_dir=cache_dir)
    return {
        "name": name,
        "path": path,
        "suite": found["suite"],
        "arch": found["arch"],
        "packages": [{k: p[k] for k in ("package", "arch", "version")} for p in found["packages"]],
        "usr_lib_entries": found["usr_lib_entries"],
        "entries": found["entries"],
        "unpacked_bytes": found["unpacked_bytes"],
        "deb_bytes": found["deb_bytes"],
    }
