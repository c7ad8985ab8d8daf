"""`tlslab guests`: what can be run, with its linkage and %gs census."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("guests", help="list the bundled and fetched guests (linkage, %%gs instructions)",
                       description="Bundled guests (guests/manifest.json: static default and nosegneg builds, "
                       "dynamic .dyn builds run through the pinned root's ld.so), Debian's busybox if fetched, "
                       "and the pinned root filesystems whose programs run by absolute path with --rootfs.")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tlslab import debian, rootfs
    from tlslab.guests import GuestError, load_manifest

    rows = []
    for entry in sorted(load_manifest()["binaries"], key=lambda e: e["key"]):
        gs = entry.get("gs", {})
        link = entry.get("link", {})
        rows.append((entry["key"], "dynamic" if link.get("dynamic") else "static",
                     f"{gs.get('total', 0)} %gs insns ({gs.get('negative', 0)} -ve literal, "
                     f"{gs.get('indirect', 0)} indirect)"))
    for name in debian.locked_guest_names():
        rows.append((name, "static", "Debian package, `tlslab fetch`"))
    width = max(len(r[0]) for r in rows)
    for key, kind, what in rows:
        print(f"{key:<{width}}  {kind:<7}  {what}")
    for name in rootfs.ROOTFS_NAMES:
        try:
            where = str(rootfs.materialise(name, fetch=False))
        except GuestError as exc:
            where = f"not fetched ({str(exc).splitlines()[0]})"
        print(f"\nroot filesystem {name}: {where}\n  run its programs by path, e.g. "
              f"`tlslab run --rootfs {name} /bin/ls -- -R /usr/lib`")
    return 0
