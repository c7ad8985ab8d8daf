"""`tlslab check-descriptor`: decode a segment descriptor and check one access through it.

    tlslab check-descriptor 0x00cff2000000ffff --offset 0xfffffffc --size 4
    tlslab check-descriptor ff ff 00 00 00 f2 cf 00 --offset=-4 --truncate

DESC is one 64-bit value as 16 hex digits (``0x`` optional), or 8 hex bytes in
memory (little-endian) order. ``--truncate`` shows what Xen installs instead
(see tlslab.x86.xen) and the verdict under it.
"""

from __future__ import annotations

import re

from tlslab.cli import UsageError

U32 = 0xFFFF_FFFF
MAX_ACCESS_SIZE = 64  # the widest x86 data access (AVX-512)


def register(sub) -> None:
    from tlslab.x86.xen import DEFAULT_PROFILE, PROFILES

    p = sub.add_parser(
        "check-descriptor",
        help="decode an x86 segment descriptor and check an access through it",
        description="Decode a GDT/LDT descriptor field by field and, with --offset, say "
        "whether the CPU allows the access (and why not), natively and after Xen's "
        "truncation.",
    )
    p.add_argument(
        "desc", nargs="+", metavar="DESC",
        help="0x00cff2000000ffff (16 hex digits) or 8 hex bytes: ff ff 00 00 00 f2 cf 00",
    )
    p.add_argument("--offset", help="32-bit offset (hex or decimal; --offset=-4 wraps to 0xfffffffc)")
    p.add_argument("--size", default="4", help="access size in bytes (default 4)")
    p.add_argument("--write", action="store_true", help="check a write (default: a read)")
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE,
        help=f"Xen build whose hypervisor_start applies (default {DEFAULT_PROFILE})",
    )
    p.add_argument("--truncate", action="store_true",
                   help="also show the descriptor Xen installs and the verdict under it")
    p.set_defaults(handler=run)


def parse_descriptor(tokens: list[str]) -> int:
    """One 16-digit hex value, or 8 hex bytes (separate or joined by spaces, ':' or ',')."""
    parts = [t for token in tokens for t in re.split(r"[\s:,]+", token.strip()) if t]
    if len(parts) == 1:
        digits = parts[0][2:] if parts[0].lower().startswith("0x") else parts[0]
        if not re.fullmatch(r"[0-9a-fA-F]+", digits):
            raise UsageError(f"descriptor {parts[0]!r} is not hexadecimal")
        if len(digits) != 16:
            raise UsageError(
                f"descriptor must be 16 hex digits (64 bits), got {len(digits)}: {parts[0]}"
            )
        return int(digits, 16)
    if len(parts) != 8:
        raise UsageError(f"descriptor bytes: expected 8, got {len(parts)}")
    if not all(re.fullmatch(r"(0x)?[0-9a-fA-F]{1,2}", b, re.IGNORECASE) for b in parts):
        raise UsageError(f"descriptor bytes must be 8 hex bytes (00..ff): {' '.join(parts)}")
    return int.from_bytes(bytes(int(b, 16) for b in parts), "little")


def parse_int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number (use decimal or 0x-hex)") from None


def parse_offset(text: str) -> int:
    value = parse_int(text, "offset")
    if not -(1 << 31) <= value <= U32:
        raise UsageError(f"offset {text} is out of the 32-bit range")
    return value & U32


def parse_size(text: str) -> int:
    value = parse_int(text, "size")
    if not 1 <= value <= MAX_ACCESS_SIZE:
        raise UsageError(f"size {text} must be 1..{MAX_ACCESS_SIZE} bytes")
    return value


def run(args) -> int:
    from tlslab.x86 import (
        check_data_access,
        flip,
        get_profile,
        linear_address,
        reaches_hypervisor,
        truncate,
        valid_offset_interval,
    )
    from tlslab.x86.descriptor import SegmentDescriptor

    raw = parse_descriptor(args.desc)
    offset = parse_offset(args.offset) if args.offset is not None else None
    size = parse_size(args.size)
    profile = get_profile(args.profile)
    desc = SegmentDescriptor.decode(raw)

    def show(label: str, value: str) -> None:
        print(f"{label + ':':<22}{value}")

    def verdict(d: SegmentDescriptor, label: str) -> None:
        check = check_data_access(d, offset, size, args.write)
        if check.allowed:
            show(label, f"allowed (linear {linear_address(d, offset):#010x})")
        else:
            show(label, f"refused: {check.reason.name}: {check.message}")

    show("descriptor", f"{raw:#018x}  bytes {desc.to_bytes().hex(' ')}")
    show("summary", desc.describe())
    show("base", f"{desc.base:#010x}")
    unit = "4 KiB units" if desc.granularity else "bytes"
    show("limit", f"{desc.limit:#07x} ({unit}) -> effective limit {desc.effective_limit:#010x}")
    show("type", f"{desc.type:#x}: accessed={int(desc.accessed)} rw={int(desc.rw)} "
                 f"dc={int(desc.dc)} executable={int(desc.executable)}")
    show("s", f"{int(desc.s)} ({'code/data' if desc.s else 'system'})")
    show("dpl", str(desc.dpl))
    show("present", str(int(desc.present)))
    show("avl", str(int(desc.avl)))
    show("l", str(int(desc.l)))
    show("db", f"{int(desc.db)} (expand-down upper bound {desc.upper_bound:#010x})")
    show("granularity", f"{int(desc.granularity)} ({unit})")
    interval = valid_offset_interval(desc)
    show("valid offsets", f"{interval[0]:#010x}..{interval[1]:#010x}" if interval else "none")
    show(f"reaches Xen ({profile.name})",
         "yes" if reaches_hypervisor(desc, profile) else "no")
    if offset is not None:
        kind = "write" if args.write else "read"
        show("access", f"{kind} of {size} byte(s) at offset {offset:#010x}")
        verdict(desc, "native")
    if args.truncate:
        truncated = truncate(desc, profile)
        if truncated == desc:
            note = "unchanged"
        elif not truncated.present:
            note = "marked not present: no limit keeps it below Xen"
        else:
            note = f"limit {truncated.limit:#07x} -> effective {truncated.effective_limit:#010x}"
        show(f"truncated ({profile.name})", f"{truncated.encode():#018x}  {note}")
        show("hypervisor_start", f"{profile.hypervisor_start:#010x}")
        if offset is not None:
            verdict(truncated, "after truncation")
            if not check_data_access(truncated, offset, size, args.write).allowed:
                flipped = flip(truncated, offset, profile, size=size)
                show("flip", f"{flipped.encode():#018x}  {flipped.describe()}"
                     if flipped else "none admits this access: the fault is genuine")
    return 0
