"""A run's process tree as text: who started whom, what each ran, what its faults were.

Read from the run record (``counters.kernel.listing``, one entry per process
in start order), so the CLI and reports show the same thing. Many identical
siblings (a boot runs hundreds of ``sed``) are folded into one line with a
count unless ``full``.
"""

from __future__ import annotations

from collections import defaultdict


def _label(p: dict) -> str:
    prog = p["program"].rsplit("/", 1)[-1]
    if p.get("killed_at_end"):
        end = "killed at end"
    elif p.get("exit_signal"):
        end = f"signal {p['exit_signal']}"
    else:
        end = f"exit {p.get('exit_status')}"
    threads = f", {p['threads']} threads" if p.get("threads", 1) > 1 else ""
    return f"{prog} [{p['pid']}]{threads}: {p['faults']:,} faults, {p['instructions']:,} insns, {end}"


def tree_lines(listing: list[dict], full: bool = False, max_lines: int = 60) -> list[str]:
    """Indented lines, parents before children; identical leaf siblings folded (``full``: never)."""
    children: dict[int, list[dict]] = defaultdict(list)
    pids = {p["pid"] for p in listing}
    roots = []
    for p in listing:
        (children[p["ppid"]] if p["ppid"] in pids else roots).append(p)
    lines: list[str] = []

    def walk(p: dict, depth: int) -> None:
        lines.append("  " * depth + _label(p))
        kids = children.get(p["pid"], [])
        if full:
            for c in kids:
                walk(c, depth + 1)
            return
        groups: dict[str, list[dict]] = defaultdict(list)
        order: list[str] = []
        for c in kids:
            key = c["program"] if not children.get(c["pid"]) else f"{c['program']}#{c['pid']}"
            if key not in groups:
                order.append(key)
            groups[key].append(c)
        for key in order:
            group = groups[key]
            if len(group) == 1:
                walk(group[0], depth + 1)
            else:
                faults = sum(c["faults"] for c in group)
                insns = sum(c["instructions"] for c in group)
                name = group[0]["program"].rsplit("/", 1)[-1]
                lines.append("  " * (depth + 1) + f"{name} x{len(group)}: {faults:,} faults, {insns:,} insns")

    for r in roots:
        walk(r, 0)
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... {len(lines) - max_lines} more lines (--json has every process)"]
    return lines


def totals(listing: list[dict]) -> dict:
    return {"processes": len(listing), "faults": sum(p["faults"] for p in listing),
            "threads": sum(p.get("threads", 1) for p in listing)}
