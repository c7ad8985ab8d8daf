"""Synthetic trees: same spec, same tree; materialise writes exactly that tree."""

from __future__ import annotations

import os

import pytest

from tlslab.linux import nodes as N
from tlslab.linux.tree import TREE_4K, TREE_SMALL, SyntheticTree, TreeSpec, TreeSpecError


def test_spec_parse_and_names():
    s = TreeSpec.parse("dirs=3,files=4,symlinks=1,depth=2,seed=7")
    assert (s.dirs, s.files, s.symlinks, s.depth, s.seed) == (3, 4, 1, 2, 7)
    assert TreeSpec.parse(str(s)) == s
    assert TreeSpec.parse("small") == TreeSpec.parse(TREE_SMALL)
    for bad in ("dirs=x", "bogus=1", "dirs", "depth=0", "files=-1"):
        with pytest.raises(TreeSpecError):
            TreeSpec.parse(bad)


def test_sizes_of_named_trees():
    assert 380 <= len(SyntheticTree(TREE_SMALL)) <= 420
    assert 3900 <= len(SyntheticTree(TREE_4K)) <= 4100


def test_deterministic_and_seed_sensitive():
    a, b = SyntheticTree(TREE_SMALL), SyntheticTree(TREE_SMALL)
    assert a.entries == b.entries
    assert all(a.content(e) == b.content(e) for e in a.entries if e.kind == "file")
    c = SyntheticTree(TREE_SMALL.replace("seed=1", "seed=2"))
    assert c.entries != a.entries


def test_tree_shape():
    t = SyntheticTree("dirs=40,files=200,symlinks=40,depth=3,seed=5")
    depths = [e.path.count("/") + 1 for e in t.entries if e.kind == "dir"]
    assert max(depths) <= 3 and max(depths) >= 2
    links = [e for e in t.entries if e.kind == "symlink"]
    paths = {e.path for e in t.entries}
    import posixpath
    dangling = [l for l in links if posixpath.normpath(posixpath.join(posixpath.dirname(l.path), l.target)) not in paths | {"."}]
    assert 0 < len(dangling) < len(links)
    for e in t.entries:
        if e.kind == "file":
            assert len(t.content(e)) == e.size


def test_materialise_matches(tmp_path):
    t = SyntheticTree(TREE_SMALL)
    root = t.materialise(tmp_path / "t")
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            seen[os.path.relpath(full, root)] = full
    assert set(seen) == {e.path for e in t.entries}
    for e in t.entries:
        st = os.lstat(seen[e.path])
        assert st.st_mtime_ns == e.mtime_ns
        if e.kind == "file":
            assert open(seen[e.path], "rb").read() == t.content(e)
            assert st.st_mode & 0o777 == e.mode
        elif e.kind == "symlink":
            assert os.readlink(seen[e.path]) == e.target
    with pytest.raises(FileExistsError):
        t.materialise(tmp_path / "t")


def test_build_gives_stable_inodes():
    a, b = SyntheticTree(TREE_SMALL).build(), SyntheticTree(TREE_SMALL).build()

    def walk(d, out, prefix=b""):
        for name, node in sorted(d.entries.items()):
            out.append((prefix + name, node.ino, node.mode, node.size, node.mtime_ns))
            if isinstance(node, N.Dir):
                walk(node, out, prefix + name + b"/")
        return out

    wa = walk(a, [])
    assert wa == walk(b, [])
    assert len({ino for _, ino, *_ in wa}) == len(wa)


def test_fast_text_generation_equals_its_definition():
    """content() draws text with getrandbits directly; it must be the same bytes as randint/choice."""
    import random

    from tlslab.linux.tree import TEXT_EXTS, _text_fast, _text_reference

    t = SyntheticTree("small")
    texts = [e for e in t.entries if e.kind == "file" and e.path.endswith(TEXT_EXTS)]
    assert len(texts) > 20
    for e in texts:
        seed = f"tlslab-file:{t.spec.seed}:{e.path}"
        assert _text_fast(random.Random(seed), e.size) == _text_reference(random.Random(seed), e.size)
    for size in (0, 1, 7, 100, 5000):
        assert _text_fast(random.Random(size), size) == _text_reference(random.Random(size), size)
