"""`tlslab fetch`: fetch and pin a real-world Debian guest (busybox-static:i386)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "fetch",
        help="fetch a Debian guest package (default busybox-static:i386) into the cache",
        description="Download a Debian package with apt-get, unpack it into the tlslab cache "
        "($TLSLAB_CACHE/debian or ~/.cache/tlslab/debian) and verify it against "
        "guests/debian.lock.json (pinning it there on first fetch).",
    )
    p.add_argument("package", nargs="?", default="busybox-static",
                   help="Debian package or guest name (default: busybox-static; 'busybox' works too)")
    p.add_argument("--arch", default="i386", help="Debian architecture (default: i386)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: see above)")
    p.add_argument("--update-lock", action="store_true",
                   help="take the version apt offers now and rewrite its lock entry")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tlslab.cli import UsageError
    from tlslab.debian import GUEST_PACKAGES, describe_binary, fetch_package, load_lock
    from tlslab.guests import GuestError

    name = GUEST_PACKAGES.get(args.package, (args.package,))[0]
    known = {pkg for pkg, _ in GUEST_PACKAGES.values()}
    if name not in known:
        raise UsageError(f"unknown package {args.package!r} (known: {', '.join(sorted(known))})")
    try:
        pkg = fetch_package(name, arch=args.arch, cache_dir=args.cache_dir,
                            update_lock=args.update_lock)
    except GuestError as exc:
        raise UsageError(str(exc)) from None
    info = load_lock().get("packages", {}).get(f"{pkg.name}:{pkg.arch}")
    if not info or info.get("binary_sha256") != pkg.binary_sha256 or "gs" not in info:
        info = describe_binary(pkg.binary)
    gs = info["gs"]
    print(f"package        {pkg.name}:{pkg.arch} {pkg.version}")
    print(f"deb            {pkg.deb}")
    print(f"deb sha256     {pkg.deb_sha256}")
    print(f"binary         {pkg.binary}")
    print(f"binary sha256  {pkg.binary_sha256}")
    print(f"elf            ELF{info['elf_class']} {info['e_machine']} {info['e_type']} "
          f"{'static' if info['static'] else 'dynamic (has PT_INTERP)'}")
    print(f"%gs insns      {gs['total']} (zero {gs['zero']}, positive {gs['positive']}, "
          f"negative {gs['negative']}, indirect {gs['indirect']})")
    return 0
