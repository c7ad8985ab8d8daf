"""The ctypes mirrors of the fast path's C structs are checked against the C side's own offsets.

A field moved in ``_fastpath.c`` without its mirror in ``fastpath.py`` (or the
other way round) would make Python read and write the wrong bytes; the check
at library load must catch both directions, so each test below fails if the
checker does nothing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from tlslab.machine import fastpath as fp


def real_layout():
    return fp.c_layout(fp.load_library())


def swapped(struct: type[ctypes.Structure], a: str, b: str) -> type[ctypes.Structure]:
    """A copy of ``struct`` with fields ``a`` and ``b`` in each other's place (the real class is untouched)."""
    fields = list(struct._fields_)
    names = [f[0] for f in fields]
    i, j = names.index(a), names.index(b)
    fields[i], fields[j] = fields[j], fields[i]
    return type(struct.__name__, (ctypes.Structure,), {"_fields_": fields})


def mirrors_with(struct_name: str, mirror) -> tuple:
    return tuple((s, mirror if s == struct_name else m, whole) for s, m, whole in fp.MIRRORS)


def test_real_library_matches_every_mirror():
    fields, sizes = real_layout()
    assert {s for s, _, _ in fp.MIRRORS} <= set(fields)
    assert sizes["fastpath"] == fp.load_library().fp_sizeof()
    fp.check_layout(fields, sizes)  # no error
    # the table is the C compiler's view: spot-check it against the mirror independently
    assert dict((n, (o, z)) for n, o, z in fields["site"])["max_offset"] == (fp.Site.max_offset.offset, 4)


def test_misordered_mirror_is_named():
    fields, sizes = real_layout()
    bad = swapped(fp.Site, "reads", "writes")
    with pytest.raises(fp.FastpathLayoutError, match=r"struct site field writes: C offset 40 size 8, "
                                                     r"Python offset 32 size 8"):
        fp.check_layout(fields, sizes, mirrors_with("site", bad))


def test_nested_mirror_inside_the_header_is_checked():
    """ExitInfo, embedded in the header, is checked field by field itself: the header's offsets would not see it."""
    fields, sizes = real_layout()
    bad = swapped(fp.ExitInfo, "eip", "linear")
    with pytest.raises(fp.FastpathLayoutError, match=r"struct exit_info field linear: C offset 16.*Python offset 8"):
        fp.check_layout(fields, sizes, mirrors_with("exit_info", bad))


def test_mirror_missing_a_field_is_detected():
    fields, sizes = real_layout()
    short = type("Window", (ctypes.Structure,), {"_fields_": [f for f in fp.Window._fields_ if f[0] != "changed"]})
    with pytest.raises(fp.FastpathLayoutError, match=r"struct window field changed: C offset 28, Python offset none"):
        fp.check_layout(fields, sizes, mirrors_with("window", short))


def test_c_side_field_added_is_detected_in_a_fake_table():
    fields, sizes = real_layout()
    fields = {k: list(v) for k, v in fields.items()}
    sizes = dict(sizes)
    # C grew a field in struct seg_stats before 'runs': everything after it moved by 8
    row = {n: k for k, (n, _, _) in enumerate(fields["seg_stats"])}["runs"]
    fields["seg_stats"] = (fields["seg_stats"][:row] + [("added", fields["seg_stats"][row][1], 8)]
                           + [(n, o + 8, z) for n, o, z in fields["seg_stats"][row:]])
    sizes["seg_stats"] += 8
    with pytest.raises(fp.FastpathLayoutError, match=r"struct seg_stats field runs: C offset 48 size 8, "
                                                     r"Python offset 40 size 8"):
        fp.check_layout(fields, sizes)


def test_c_side_field_added_at_the_end_is_detected():
    """No offset moves, only the size: caught by the size (a whole mirror must have every C field)."""
    fields, sizes = real_layout()
    fields = dict(fields, site=fields["site"] + [("added", sizes["site"], 8)])
    sizes = dict(sizes, site=sizes["site"] + 8)
    with pytest.raises(fp.FastpathLayoutError, match=r"struct site field added: C offset 80, Python offset none"):
        fp.check_layout(fields, sizes)


@pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
def test_recompiled_c_variant_is_detected(tmp_path):
    """The real source with one field inserted, compiled: its own offsetof table disagrees with Python."""
    source = fp.SOURCE.read_text()
    anchor = "    int32_t slot;           /* GDT index, 0 = unused */\n"
    assert anchor in source
    variant = tmp_path / "_fastpath_variant.c"
    variant.write_text(source.replace(anchor, anchor.replace("slot;", "slot, inserted;"), 1))
    lib_path = tmp_path / "variant.so"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, *fp.COMPILE_FLAGS, "-o", str(lib_path), str(variant), str(fp.CORE_SOURCE)], check=True)
    fields, sizes = fp.c_layout(ctypes.CDLL(str(lib_path)))
    assert sizes["window"] == ctypes.sizeof(fp.Window) + 4
    with pytest.raises(fp.FastpathLayoutError, match=r"struct window field pad: C offset 24 size 4, "
                                                     r"Python offset 20 size 4"):
        fp.check_layout(fields, sizes)


def test_load_library_refuses_a_wrong_layout(monkeypatch):
    """The check runs at load: with a mis-ordered mirror registered, loading raises instead of returning."""
    monkeypatch.setattr(fp, "_LIB", None)
    monkeypatch.setattr(fp, "MIRRORS", mirrors_with("seg_stats", swapped(fp.SegStats, "negative", "positive")))
    with pytest.raises(fp.FastpathLayoutError, match=r"struct seg_stats field positive"):
        fp.load_library()
    assert fp._LIB is None
