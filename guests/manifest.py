#!/usr/bin/env python3
"""Write guests/manifest.json for the built guests (called by guests/Makefile).

Per binary: registry key, name, variant, path, source path + sha256, compiler,
glibc (Debian libc6-dev-i386 version), full flags, binary sha256 and size, the
linkage read back from the ELF (static or dynamic; ELF type; PIE; PT_INTERP;
DT_NEEDED), and the %gs census (tlslab.guests.gs_census) for the whole binary
and for our own code. A dynamically linked build also records the libc it was
linked against at build time (libc6-i386, the 32-bit shared glibc here) and the
Debian i386 libc it is meant to run with (glibc_runtime). No timestamps or
absolute paths: the manifest is reproducible.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))        # use this checkout's tlslab

from tlslab.guests import VARIANT_SUFFIX, VARIANTS, gs_census, sha256_file  # noqa: E402


def runtime_libc(glibc_shared: str) -> str:
    """The libc6:i386 of the pinned Debian i386 root (guests/rootfs.lock.json) the dyn
    builds run under, checked to be the same upstream glibc as the multilib
    libc6-i386 they were linked against here (so ABI-identical)."""
    lock = HERE / "rootfs.lock.json"
    try:
        roots = json.loads(lock.read_text())["roots"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{lock}: cannot read the i386 root's libc6 ({exc})") from None
    for root in roots.values():
        for pkg in root.get("packages", []):
            if pkg.get("package") == "libc6" and pkg.get("arch") == "i386":
                ver = pkg["version"]
                linked = glibc_shared.split()[-1]
                if ver.split("-")[0] != linked.split("-")[0]:
                    raise SystemExit(f"root libc6:i386 {ver} is not the glibc linked against ({glibc_shared})")
                return (f"libc6:i386 {ver} (Debian {root.get('suite', '?')} i386 root, "
                        f"guests/rootfs.lock.json: /lib/ld-linux.so.2, libc.so.6)")
    raise SystemExit(f"{lock}: no libc6:i386 in any root")


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unknown ({exc})"
    return out.splitlines()[0].strip() if out else "unknown"


def linkage(path: Path) -> dict:
    """How the binary is linked, read from its ELF headers and dynamic section."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        interp = None
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_INTERP":
                interp = seg.get_interp_name()
        needed, flags_1 = [], 0
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                for tag in sec.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif tag.entry.d_tag == "DT_FLAGS_1":
                        flags_1 = tag.entry.d_val
        return {
            "dynamic": interp is not None,
            "elf_type": elf["e_type"],
            "pie": elf["e_type"] == "ET_DYN" and bool(flags_1 & 0x08000000),   # DF_1_PIE
            "interp": interp,
            "needed": needed,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cc", default="gcc")
    for variant in VARIANTS:
        ap.add_argument(f"--flags-{variant}", required=True)
    ap.add_argument("--out", default="manifest.json")
    ap.add_argument("guests", nargs="+")
    args = ap.parse_args()

    os.chdir(HERE)
    compiler = first_line([args.cc, "--version"])
    glibc = first_line(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "libc6-dev-i386"])
    glibc_shared = first_line(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "libc6-i386"])
    glibc_runtime = None
    binutils = first_line(["ld", "--version"])
    binaries = []
    for name in args.guests:
        src = Path("src") / f"{name}.c"
        for variant in VARIANTS:
            flags, suffix = getattr(args, f"flags_{variant}"), VARIANT_SUFFIX[variant]
            path = Path("bin") / f"{name}{suffix}"
            link = linkage(path)
            if link["dynamic"]:
                link["glibc_shared"] = glibc_shared
                glibc_runtime = glibc_runtime or runtime_libc(glibc_shared)
                link["glibc_runtime"] = glibc_runtime
                if not link["pie"]:
                    raise SystemExit(f"{path}: expected a PIE (Debian gcc's default), got {link['elf_type']}")
            if link["dynamic"] != (variant == "dyn"):
                raise SystemExit(f"{path}: variant {variant} but dynamic={link['dynamic']}")
            binaries.append({
                "key": f"{name}{suffix}",
                "name": name,
                "variant": variant,
                "path": str(path),
                "source": {"path": str(src), "sha256": sha256_file(src)},
                "compiler": compiler,
                "linker": binutils,
                "glibc": glibc,
                "flags": flags,
                "command": f"{args.cc} {flags} -o {path} {src}",
                "sha256": sha256_file(path),
                "size": path.stat().st_size,
                "link": link,
                "gs": gs_census(path, src),
            })
    manifest = {
        "comment": "generated by guests/manifest.py from `make -C guests`; do not edit",
        "gs_census": "capstone linear sweep of executable sections; zero = %gs:0, "
                     "positive/negative = direct %gs:disp, indirect = %gs:(reg...); "
                     "own = functions from the guest's own source file",
        "binaries": binaries,
    }
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(binaries)} binaries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
