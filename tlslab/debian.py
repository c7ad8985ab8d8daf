"""Fetch real-world guests from Debian's i386 archive, pinned by a lock file.

The real-world guest is ``busybox-static:i386``: an unmodified, glibc-static
program suite nobody here wrote. :func:`fetch_package` downloads it with the
ordinary apt client (``apt-get download``), unpacks it with ``dpkg-deb -x`` into
a cache, and pins package version, ``.deb`` sha256 and binary sha256 in
``guests/debian.lock.json``. Later runs verify against the lock and touch apt
only when the cache is empty.

Cache: ``$TLSLAB_CACHE/debian/`` if ``TLSLAB_CACHE`` is set, else
``~/.cache/tlslab/debian/``; one directory per ``<package>_<version>_<arch>``.

Errors: :class:`DebianUnavailable` (no apt/dpkg, not root when apt must change
state, archive unreachable, locked version no longer offered) is what tests turn
into a skip; :class:`DebianMismatch` (a cached or downloaded file does not match
the lock) is an integrity failure. Both are :class:`tlslab.guests.GuestError`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tlslab.artifacts import GuestBinary, GuestError, guests_dir, sha256_file, user_cache_dir
from tlslab.census import gs_census

# registry name -> (Debian package, binary path inside the package)
GUEST_PACKAGES: dict[str, tuple[str, str]] = {"busybox": ("busybox-static", "bin/busybox")}
DEFAULT_ARCH = "i386"
REFRESH_HINT = "refresh with `tlslab fetch --update-lock {name}` (then re-measure and commit guests/debian.lock.json)"


class DebianUnavailable(GuestError):
    """apt/dpkg cannot provide the package here (tests skip on this)."""


class DebianMismatch(GuestError):
    """A cached or downloaded file does not match guests/debian.lock.json."""


@dataclass(frozen=True)
class FetchedPackage:
    name: str
    arch: str
    version: str
    deb: Path
    deb_sha256: str
    root: Path              # dpkg-deb -x destination
    binary: Path            # the guest executable inside root
    binary_sha256: str


# --------------------------------------------------------------------------- paths / lock

def cache_root() -> Path:
    return user_cache_dir() / "debian"


def lock_path() -> Path:
    return guests_dir() / "debian.lock.json"


def load_lock() -> dict:
    try:
        with open(lock_path()) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"packages": {}}
    except json.JSONDecodeError as exc:
        raise GuestError(f"{lock_path()} is not valid JSON: {exc}") from None


def _write_lock(lock: dict) -> None:
    path = lock_path()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _pkgdir(cache: Path, name: str, version: str, arch: str) -> Path:
    """Cache directory of one package version (epoch colon escaped as in .deb names)."""
    return cache / f"{name}_{version.replace(':', '%3a')}_{arch}"


def _lock_key(name: str, arch: str) -> str:
    return f"{name}:{arch}"


def locked_guest_names() -> list[str]:
    packages = load_lock().get("packages", {})
    return [guest for guest, (pkg, _) in GUEST_PACKAGES.items()
            if _lock_key(pkg, DEFAULT_ARCH) in packages]


def _binary_for(name: str) -> str:
    for pkg, binary in GUEST_PACKAGES.values():
        if pkg == name:
            return binary
    raise GuestError(f"no guest binary known for Debian package {name!r} "
                     f"(known: {', '.join(p for p, _ in GUEST_PACKAGES.values())})")


# --------------------------------------------------------------------------- apt plumbing

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    except FileNotFoundError:
        raise DebianUnavailable(f"`{cmd[0]}` not found: Debian tools (apt, dpkg) are needed") from None


def _last_line(cp: subprocess.CompletedProcess) -> str:
    lines = [line for line in (cp.stderr or cp.stdout or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {cp.returncode}"


def _require_tools() -> None:
    for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DebianUnavailable(f"`{tool}` not found: fetching Debian packages needs apt and dpkg")


def _require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise DebianUnavailable(f"{why} needs root (run as root, or pre-populate the cache {cache_root()})")


def _ensure_arch(arch: str) -> None:
    native = _run(["dpkg", "--print-architecture"]).stdout.strip()
    if arch == native:
        return
    foreign = _run(["dpkg", "--print-foreign-architectures"]).stdout.split()
    if arch in foreign:
        return
    _require_root(f"`dpkg --add-architecture {arch}`")
    cp = _run(["dpkg", "--add-architecture", arch])
    if cp.returncode != 0:
        raise DebianUnavailable(f"dpkg --add-architecture {arch} failed: {_last_line(cp)}")


def _available_versions(spec: str) -> list[str]:
    """Versions apt knows for ``name:arch`` (empty if the package is unknown)."""
    cp = _run(["apt-cache", "madison", spec])
    versions = []
    for line in cp.stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 2 and parts[1]:
            versions.append(parts[1])
    return versions


def _apt_update() -> str:
    """Run ``apt-get update``; returns "" or its last error line.

    A partial failure (one index out of sync on the mirror) is common and not
    fatal: the caller checks whether the package became known.
    """
    _require_root("`apt-get update`")
    cp = _run(["apt-get", "update", "-q"])
    if cp.returncode == 0:
        return ""
    errors = [line for line in (cp.stdout + cp.stderr).splitlines() if line.startswith(("E:", "Err:"))]
    return errors[0] if errors else _last_line(cp)


def _download(spec: str, dest: Path) -> Path:
    """``apt-get download spec`` into ``dest``; returns the .deb path."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        os.chmod(tmp, 0o777)     # let apt's unprivileged _apt user write here
        cp = _run(["apt-get", "download", "-q", spec], cwd=Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if cp.returncode != 0 or len(debs) != 1:
            raise DebianUnavailable(f"apt-get download {spec} failed: {_last_line(cp)}")
        target = dest / debs[0].name
        os.replace(debs[0], target)
    return target


def _deb_field(deb: Path, field: str) -> str:
    cp = _run(["dpkg-deb", "-f", str(deb), field])
    if cp.returncode != 0:
        raise DebianMismatch(f"{deb}: not a readable .deb ({_last_line(cp)})")
    return cp.stdout.strip()


def _extract(deb: Path, root: Path) -> None:
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cp = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    if cp.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DebianMismatch(f"dpkg-deb -x {deb} failed: {_last_line(cp)}")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


# --------------------------------------------------------------------------- public API

def fetch_package(name: str = "busybox-static", arch: str = DEFAULT_ARCH,
                  cache_dir: str | os.PathLike | None = None,
                  update_lock: bool = False) -> FetchedPackage:
    """Return the cached, lock-verified package, downloading it if needed.

    With no lock entry (first fetch) or ``update_lock=True`` the candidate
    version apt offers is downloaded and pinned in ``guests/debian.lock.json``.
    Otherwise exactly the locked version is used; if Debian no longer offers it
    a :class:`DebianUnavailable` says how to refresh.
    """
    binary_rel = _binary_for(name)
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    lock = load_lock()
    key = _lock_key(name, arch)
    entry = None if update_lock else lock.get("packages", {}).get(key)
    hint = REFRESH_HINT.format(name=name)

    if entry is not None:
        pkgdir = _pkgdir(cache, name, entry["version"], arch)
        deb = pkgdir / entry["deb"]
        if not deb.is_file():
            deb = _download_locked(name, arch, entry, pkgdir, hint)
        return _verify_and_extract(name, arch, entry, deb, pkgdir, hint)

    # first fetch, or refresh: take what apt offers now and pin it
    _require_tools()
    spec = f"{name}:{arch}"
    _ensure_arch(arch)
    if not _available_versions(spec):
        err = _apt_update()
        if not _available_versions(spec):
            why = f"apt-get update: {err}" if err else "check /etc/apt/sources.list"
            raise DebianUnavailable(f"apt knows no package {spec} ({why})")
    staging = cache / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    deb = _download(spec, staging)
    version = _deb_field(deb, "Version")
    pkgdir = _pkgdir(cache, name, version, arch)
    pkgdir.mkdir(parents=True, exist_ok=True)
    final = pkgdir / deb.name
    os.replace(deb, final)
    shutil.rmtree(staging, ignore_errors=True)
    root = pkgdir / "root"
    _extract(final, root)
    binary = root / binary_rel
    if not binary.is_file():
        raise GuestError(f"{final.name} has no {binary_rel}")
    entry = {
        "package": name,
        "arch": arch,
        "version": version,
        "deb": final.name,
        "deb_sha256": sha256_file(final),
        "deb_size": final.stat().st_size,
        "binary": binary_rel,
        "binary_sha256": sha256_file(binary),
        "binary_size": binary.stat().st_size,
    }
    entry.update(describe_binary(binary))
    lock.setdefault("packages", {})[key] = entry
    _write_lock(lock)
    return FetchedPackage(name, arch, version, final, entry["deb_sha256"], root, binary,
                          entry["binary_sha256"])


def _download_locked(name: str, arch: str, entry: dict, pkgdir: Path, hint: str) -> Path:
    _require_tools()
    spec = f"{name}:{arch}"
    _ensure_arch(arch)
    versions = _available_versions(spec)
    err = ""
    if entry["version"] not in versions:
        err = _apt_update()
        versions = _available_versions(spec)
    if entry["version"] not in versions:
        offered = ", ".join(versions) or "none"
        extra = f"; apt-get update: {err}" if err and not versions else ""
        raise DebianUnavailable(
            f"{spec} {entry['version']} pinned in {lock_path().name} is not offered by apt "
            f"(offered: {offered}{extra}); {hint}")
    deb = _download(f"{spec}={entry['version']}", pkgdir)
    if deb.name != entry["deb"]:
        os.replace(deb, pkgdir / entry["deb"])
        deb = pkgdir / entry["deb"]
    return deb


def _verify_and_extract(name: str, arch: str, entry: dict, deb: Path, pkgdir: Path,
                        hint: str) -> FetchedPackage:
    digest = sha256_file(deb)
    if digest != entry["deb_sha256"]:
        raise DebianMismatch(
            f"{deb} sha256 {digest[:16]}... != locked {entry['deb_sha256'][:16]}... "
            f"(delete {pkgdir} to re-download, or {hint})")
    root = pkgdir / "root"
    binary = root / entry["binary"]
    if not binary.is_file() or sha256_file(binary) != entry["binary_sha256"]:
        _extract(deb, root)
    bdigest = sha256_file(binary) if binary.is_file() else "missing"
    if bdigest != entry["binary_sha256"]:
        raise DebianMismatch(
            f"{binary} sha256 {bdigest[:16]}... != locked {entry['binary_sha256'][:16]}... "
            f"although the .deb matches; {hint}")
    return FetchedPackage(name, arch, entry["version"], deb, digest, root, binary, bdigest)


def describe_binary(path: Path) -> dict:
    """ELF facts the lock records: class, machine, static or not, %gs census."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        info = {
            "elf_class": elf.elfclass,
            "e_machine": elf["e_machine"],
            "e_type": elf["e_type"],
            "static": not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments()),
        }
    census = gs_census(path)
    info["gs"] = census
    return info


def resolve_debian_guest(guest: str) -> GuestBinary:
    """``busybox`` -> the lock-verified cached binary (fetching it if needed)."""
    package, _binary = GUEST_PACKAGES[guest]
    fetched = fetch_package(package)
    return GuestBinary(guest, "debian", fetched.binary, fetched.binary_sha256, fetched.deb,
                       {"package": package, "version": fetched.version,
                        "deb_sha256": fetched.deb_sha256})
