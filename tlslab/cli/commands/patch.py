"""`tlslab patch`: binary-rewriting patch sets as artefacts.

    tlslab patch record lsr --strategy rewrite            # -> patches/lsr.default.rewrite.json
    tlslab patch show patches/lsr.default.rewrite.json
    tlslab patch apply patches/lsr.default.rewrite.json guests/bin/lsr -o /tmp/lsr.rewritten

``record`` runs a guest under a rewriting strategy (rewrite, rewrite-2004) and
writes every patch it made (site, symbol+offset, ELF file offset, old/new
bytes, why) as JSON. ``apply`` writes the statically rewritten binary; it
verifies every patch's old bytes first and refuses with one line otherwise.
Only in-place patch sets (strategy rewrite) can be applied: a rewrite-2004 set
calls into the out-of-line buffer at 0x1000, which is not in the ELF file. A
statically rewritten binary needs the fs-twin ABI at run time (%fs = expand-down
twin of the TCB descriptor in GDT slot 7; see tlslab.hypervisor.patches).
"""

from __future__ import annotations

import sys

from tlslab.cli import UsageError

REWRITING = ("rewrite", "rewrite-2004")


def register(sub) -> None:
    from tlslab.guests import VARIANTS
    from tlslab.hypervisor.patchpolicy import PAGE_SHARING, PATCH_POLICIES

    p = sub.add_parser("patch", help="record, show and statically apply binary-rewriting patch sets",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    psub = p.add_subparsers(dest="patch_command", metavar="ACTION")

    r = psub.add_parser("record", help="run a guest under a rewriting strategy and save its patch set")
    r.add_argument("guest", help="bundled guest name or path to a static i386 ELF")
    r.add_argument("--arg", "-a", dest="guest_args", action="append", default=[], metavar="ARG",
                   help="one guest argument (repeat for more; e.g. -a /proc/self/exe -a /out)")
    r.add_argument("--strategy", "-s", choices=REWRITING, default="rewrite")
    r.add_argument("--variant", choices=VARIANTS, default="default")
    r.add_argument("--patch-policy", choices=PATCH_POLICIES, default="exe",
                   help="which code may be patched (exe: the executable's file-backed code; lib: libraries "
                   "mapped from under /lib; see `tlslab run --help`)")
    r.add_argument("--page-sharing", choices=PAGE_SHARING, default="shared",
                   help="patch the page-cache page (shared, as XenLinux) or a private copy")
    r.add_argument("--tree", default="small", help="synthetic tree spec for the guest's filesystem")
    r.add_argument("--output", "-o", default=None,
                   help="patch-set file (default patches/<guest>.<variant>.<strategy>.json)")
    r.set_defaults(handler=record)

    s = psub.add_parser("show", help="list the patches of a patch set")
    s.add_argument("patchset")
    s.set_defaults(handler=show)

    a = psub.add_parser("apply", help="write the statically rewritten binary")
    a.add_argument("patchset")
    a.add_argument("binary")
    a.add_argument("--output", "-o", required=True)
    a.set_defaults(handler=apply)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def run_and_record(guest: str, args=(), strategy: str = "rewrite", variant: str = "default",
                   patch_policy: str = "exe", page_sharing: str = "shared", tree: str = "small"):
    """Run ``guest`` under a rewriting strategy; returns (domain, result, guest binary)."""
    from tlslab.experiment import RunSpec, make_domain

    spec = RunSpec(guest=guest, args=tuple(args), strategy=strategy, variant=variant, tree=tree,
                   patch_policy=patch_policy, page_sharing=page_sharing)
    domain, binary = make_domain(spec)
    result = domain.run()
    return domain, result, binary


def record(args) -> int:
    from tlslab.guests import GuestError
    from tlslab.hypervisor.patches import default_patch_path, save_patch_set
    from tlslab.linux.elf import ElfError

    from tlslab.linux.tree import TreeSpec, TreeSpecError

    try:
        TreeSpec.parse(args.tree)
    except TreeSpecError as exc:
        raise UsageError(str(exc)) from None
    try:
        domain, result, binary = run_and_record(args.guest, args.guest_args, args.strategy, args.variant,
                                                args.patch_policy, args.page_sharing, args.tree)
    except (GuestError, ElfError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        raise UsageError(str(exc)) from None
    out = args.output or default_patch_path(binary.name, binary.variant, args.strategy)
    path = save_patch_set(domain, out, guest=binary.name, variant=binary.variant)
    ps = domain.strategy.patch_set
    status = result.crash.describe() if result.crash else f"exit status {result.status}"
    sites = len([p for p in ps.patches if p.kind != "fixup-stub"])
    print(f"{binary.name} ({binary.variant}) under {args.strategy}: {status}; "
          f"{domain.strategy.counters.traps} traps, {sites} patches -> {path}")
    return 0 if result.ok else 1


def _regular_file(path: str, what: str) -> None:
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{what} {path} is not a regular file")


def show(args) -> int:
    from tlslab.hypervisor.patches import PatchError, load_patch_set

    _regular_file(args.patchset, "patch set")
    try:
        ps = load_patch_set(args.patchset)
    except PatchError as exc:
        raise UsageError(str(exc)) from None
    except (ValueError, AttributeError) as exc:    # not UTF-8, not a JSON object
        raise UsageError(f"{args.patchset}: not a patch set ({exc})") from None
    print(f"{ps.guest} ({ps.variant}) {ps.strategy}: {len(ps.patches)} patches, "
          f"{'in place' if ps.in_place else 'out-of-line buffer at ' + ps.out_of_line.get('address', '?')}")
    if ps.abi:
        print(f"  ABI: {ps.abi}")
    for p in ps.patches:
        where = f"file {p.file_offset:#x}" if p.file_offset is not None else "no file offset"
        print(f"  {p.address:#010x} {p.symbol:<32} {where:<16} {p.old} -> {p.new}  [{p.kind}] {p.instruction}")
    return 0


def apply(args) -> int:
    from tlslab.hypervisor.patches import PatchError, apply_file

    _regular_file(args.patchset, "patch set")
    _regular_file(args.binary, "binary")
    try:
        n = apply_file(args.patchset, args.binary, args.output)
    except PatchError as exc:
        raise UsageError(str(exc)) from None
    except (ValueError, AttributeError) as exc:
        raise UsageError(f"{args.patchset}: not a patch set ({exc})") from None
    print(f"applied {n} patches: {args.output}", file=sys.stdout)
    return 0
