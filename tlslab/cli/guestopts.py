"""The options that say *what runs* (guest, build, filesystem, environment), shared by every command.

`run`, `faults` and `hybrid` describe a guest run the same way; declaring the
options once keeps their choices (variants, trees, root filesystems) in step
with the registries instead of repeating literals in each command.
"""

from __future__ import annotations

import os

from tlslab.cli import UsageError

GUEST_HELP = ("bundled guest name (see `tlslab guests`; lsr, lsr.nosegneg, lsr.dyn), busybox, a path to an "
              "i386 ELF, or with --rootfs an absolute path inside the root (e.g. /bin/ls)")


MAX_TIMEOUT = 7 * 86400.0
MAX_SEED = 2**63 - 1


def add_guest_options(p, tree_default_note: str = "small") -> None:
    """Guest, arguments, build variant, filesystem and environment options."""
    from tlslab.guests import VARIANTS
    from tlslab.linux.tree import LIMITS_HELP

    p.add_argument("guest", help=GUEST_HELP)
    p.add_argument("args", nargs="*", help="guest arguments (put them after --)")
    p.add_argument("--variant", choices=VARIANTS, default="default",
                   help="guest build variant (the name suffix .nosegneg/.dyn says the same)")
    p.add_argument("--profile", choices=("nonpae", "pae"), default="nonpae", help="hypervisor start profile")
    fs = p.add_mutually_exclusive_group()
    fs.add_argument("--tree", default=None,
                    help=f"synthetic tree spec or name (small, 4k, dirs=..,files=..,symlinks=..,depth=..); "
                    f"{LIMITS_HELP}; default: {tree_default_note}")
    fs.add_argument("--root", default=None, help="show this host directory read-only instead of a synthetic tree")
    p.add_argument("--rootfs", default=None, metavar="NAME",
                   help="run inside a pinned root filesystem (debian; see `tlslab rootfs`): absolute guest paths, "
                   "ld.so and libraries come from it; dynamically linked guests get debian by default")
    p.add_argument("--tree-at", default="/data", metavar="PATH",
                   help="with a root filesystem: mount --tree/--root at this guest path and start there (default /data)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="set (K=V) or remove (K=) a guest environment variable; repeatable. Fixed default: "
                   "PATH, HOME, LANG=C, TERM=dumb, and LC_ALL=C under a root filesystem")
    p.add_argument("--applet", default=None, help="argv[0] (busybox applet name, e.g. ls)")
    p.add_argument("--seed", type=int, default=0, help=f"seed for getrandom/AT_RANDOM and the tree (0..2^63-1)")
    p.add_argument("--timeout", type=float, default=0,
                   help=f"wall-clock limit in seconds for the whole run, building its filesystem included "
                   f"(0: none; at most {MAX_TIMEOUT:g})")


def spec_from_args(args, strategy: str, **extra):
    """A RunSpec from the options above (bad values: UsageError, one line).

    A program of the root (``--rootfs NAME /abs/path``) works on the root: it
    gets no data tree unless one is named. Every other guest gets ``small``.
    """
    from tlslab.experiment import RunSpec
    from tlslab.linux.tree import TreeSpec, TreeSpecError

    import math

    if args.tree is not None:
        try:
            TreeSpec.parse(args.tree)
        except TreeSpecError as exc:
            raise UsageError(str(exc)) from None
    if not math.isfinite(args.timeout) or not 0 <= args.timeout <= MAX_TIMEOUT:
        raise UsageError(f"--timeout {args.timeout:g}: expected 0 (no limit) .. {MAX_TIMEOUT:g} seconds")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed {args.seed}: expected 0 .. 2^63-1")
    if not args.guest or "\x00" in args.guest or any("\x00" in a for a in args.args):
        raise UsageError("the guest and its arguments must be non-empty strings without NUL characters")
    if args.rootfs is not None:
        from tlslab.rootfs import ROOTFS_NAMES

        if args.rootfs not in ROOTFS_NAMES:
            raise UsageError(f"--rootfs {args.rootfs!r}: unknown root filesystem (choose from "
                             f"{', '.join(ROOTFS_NAMES)}; see `tlslab rootfs`)")
    if args.root is not None and not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root!r}: not a directory")
    if args.root is not None and os.path.islink(args.root.rstrip("/") or "/"):
        # the read-only view is taken of the directory itself (vfs.Vfs.from_host does not follow a link at the top)
        raise UsageError(f"--root {args.root!r} is a symbolic link: give the directory it points to "
                         f"({os.path.realpath(args.root)})")
    for item in args.env:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"--env {item!r}: expected KEY=VALUE (or KEY= to remove KEY)")
    if not args.tree_at.startswith("/") or args.tree_at.rstrip("/") == "":
        raise UsageError(f"--tree-at {args.tree_at!r}: expected an absolute path below /")
    rooted = args.rootfs is not None and args.guest.startswith("/")
    return RunSpec(guest=args.guest, args=tuple(args.args), strategy=strategy, profile=args.profile,
                   tree=args.tree or (None if rooted else "small"), root=args.root, seed=args.seed,
                   variant=args.variant, applet=args.applet, timeout_seconds=args.timeout,
                   rootfs=args.rootfs, tree_at=args.tree_at, env=tuple(args.env), **extra)
