"""`tlslab rootfs`: the pinned Debian i386 root filesystem (fetch, path, list)."""

from __future__ import annotations

_CACHE_HELP = ("cache directory: .debs under DIR/debian, roots under DIR/rootfs "
               "(default: $TLSLAB_CACHE or ~/.cache/tlslab)")


def register(sub) -> None:
    p = sub.add_parser(
        "rootfs",
        help="the pinned Debian i386 root filesystem (fetch, path, list)",
        description="Build a root directory from the Debian i386 packages pinned in "
        "guests/rootfs.lock.json (coreutils, libc6, dash, grep, sed, findutils, their "
        "libraries and packages that give /usr/lib a real system's size), verified by sha256.",
    )
    p.set_defaults(handler=lambda args: _usage(p))
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    f = actions.add_parser(
        "fetch", help="download, verify and unpack the root; print its directory last",
        description="Download the pinned .deb files with apt-get (only those not cached), "
        "check each against the lock's sha256, unpack them all with dpkg-deb -x and print a "
        "summary; the last line is the root's directory.")
    f.add_argument("name", nargs="?", default="debian", help="root name (default: debian)")
    f.add_argument("--update-lock", action="store_true",
                   help="download the versions apt offers now and rewrite the root's entry "
                   "in guests/rootfs.lock.json (without it, exactly the lock is used)")
    f.add_argument("--cache-dir", default=None, help=_CACHE_HELP)
    f.set_defaults(handler=run_fetch)

    q = actions.add_parser(
        "path", help="print the root's directory (from cached .debs; never downloads)",
        description="Print the materialised root's directory as the last line, unpacking it "
        "from cached .deb files if needed. Never downloads: if the root is not fetched, "
        "this is an error telling you to run `tlslab rootfs fetch`.")
    q.add_argument("name", nargs="?", default="debian", help="root name (default: debian)")
    q.add_argument("--cache-dir", default=None, help=_CACHE_HELP)
    q.set_defaults(handler=run_path)

    ls = actions.add_parser(
        "list", help="list the packages pinned in guests/rootfs.lock.json",
        description="List the root's pinned packages: name:arch, version, .deb size, sha256.")
    ls.add_argument("name", nargs="?", default="debian", help="root name (default: debian)")
    ls.set_defaults(handler=run_list)


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run_fetch(args) -> int:
    from tlslab.cli import UsageError
    from tlslab.guests import GuestError
    from tlslab.rootfs import describe, materialise, update_lock

    try:
        if args.update_lock:
            update_lock(args.name, cache_dir=args.cache_dir)
        materialise(args.name, fetch=True, cache_dir=args.cache_dir)
        info = describe(args.name, cache_dir=args.cache_dir)
    except GuestError as exc:
        raise UsageError(str(exc)) from None
    print(f"root           {info['name']} (Debian {info['suite']} {info['arch']}, "
          f"{len(info['packages'])} packages)")
    for pkg in info["packages"]:
        spec = f"{pkg['package']}:{pkg['arch']}"
        print(f"  {spec:<28} {pkg['version']}")
    print(f"usr/lib        {info['usr_lib_entries']} entries")
    print(f"size           {_mb(info['unpacked_bytes'])} unpacked, "
          f"{_mb(info['deb_bytes'])} of .deb files, {info['entries']} entries")
    print(info["path"])
    return 0


def run_path(args) -> int:
    from tlslab.cli import UsageError
    from tlslab.guests import GuestError
    from tlslab.rootfs import materialise

    try:
        path = materialise(args.name, fetch=False, cache_dir=args.cache_dir)
    except GuestError as exc:
        raise UsageError(str(exc)) from None
    print(path)
    return 0


def run_list(args) -> int:
    from tlslab.cli import UsageError
    from tlslab.guests import GuestError
    from tlslab.rootfs import lock_entry

    try:
        entry = lock_entry(args.name)
    except GuestError as exc:
        raise UsageError(str(exc)) from None
    print(f"# {args.name}: Debian {entry['suite']} {entry['arch']}, "
          f"{len(entry['packages'])} packages")
    for pkg in entry["packages"]:
        spec = f"{pkg['package']}:{pkg['arch']}"
        print(f"{spec:<30} {pkg['version']:<28} {pkg['size']:>9}  {pkg['sha256']}")
    return 0
