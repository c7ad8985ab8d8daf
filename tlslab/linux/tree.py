"""Deterministic synthetic directory trees, in guest memory or materialised on disk.

A spec string such as ``dirs=30,files=350,symlinks=20,depth=4,seed=1`` fixes the
whole tree: names, nesting, sizes, contents, modes, mtimes and symlink targets
(some dangling) all come from a seeded RNG, so the same spec is the same tree
on every machine. ``materialise`` writes that identical tree to a host
directory so a native run can be compared byte for byte with a guest run.
"""

from __future__ import annotations

import os
import posixpath
import random
from dataclasses import dataclass, fields

from tlslab.linux import nodes as N

TREE_SMALL = "dirs=30,files=350,symlinks=20,depth=4,seed=1"          # ~400 entries
TREE_4K = "dirs=300,files=3500,symlinks=200,depth=6,seed=1,fanout=10"  # ~4,000 entries
NAMED_TREES = {"small": TREE_SMALL, "4k": TREE_4K}

EPOCH = 1096588800  # 2004-10-01 00:00:00 UTC, the month of the xen-devel thread
SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["qu", "th", "sh", "x"]
TEXT_EXTS = (".txt", ".c", ".h", ".md", ".csv")
BIN_EXTS = (".o", ".bin", ".gz", ".so", "")
WORDS = ("segment limit gs fs descriptor xen glibc tls errno flip emulate page fault thread "
         "kernel guest hypervisor base offset negative positive canary").split()


class TreeSpecError(ValueError):
    """A malformed tree spec string (one line)."""


#: Bounds of every tree spec (inclusive): a tree is built in memory before the guest starts, so a spec
#: is refused with one line instead of taking minutes and gigabytes. ``entries`` = dirs + files + symlinks.
LIMITS = {"dirs": 100_000, "files": 500_000, "symlinks": 100_000, "depth": 64, "seed": 2**63 - 1,
          "fanout": 1_000_000, "dangling": 100, "max_size": 64 << 20}
MAX_ENTRIES = 500_000
MAX_SPEC_CHARS = 1000
LIMITS_HELP = (f"at most {LIMITS['dirs']:,} dirs, {LIMITS['files']:,} files, {LIMITS['symlinks']:,} symlinks "
               f"and {MAX_ENTRIES:,} entries in all; depth 1..{LIMITS['depth']}; max_size <= 64 MiB")


@dataclass(frozen=True)
class TreeSpec:
    dirs: int = 30
    files: int = 350
    symlinks: int = 20
    depth: int = 4
    seed: int = 1
    fanout: int = 8          # at most this many subdirectories per directory (soft)
    dangling: int = 25       # percent of symlinks that point nowhere
    max_size: int = 262144   # largest file, bytes

    @classmethod
    def parse(cls, text: str) -> TreeSpec:
        if not isinstance(text, str):
            raise TreeSpecError(f"a tree spec is a string, not {type(text).__name__}")
        if len(text) > MAX_SPEC_CHARS:
            raise TreeSpecError(f"tree spec of {len(text)} characters (at most {MAX_SPEC_CHARS})")
        text = NAMED_TREES.get(text, text)
        known = {f.name for f in fields(cls)}
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise TreeSpecError(f"bad tree spec item {part!r} (known: {', '.join(sorted(known))}; or a name: "
                                    f"{', '.join(NAMED_TREES)})")
            value = value.strip()
            if not value.isascii() or not value.isdigit() or len(value) > 19:
                raise TreeSpecError(f"tree spec {key}={value!r} is not an integer 0..{LIMITS[key]}")
            values[key] = int(value)
            if values[key] > LIMITS[key]:
                raise TreeSpecError(f"tree spec {key}={values[key]} is more than the limit of {LIMITS[key]:,}")
        if values.get("depth", 1) < 1:
            raise TreeSpecError("tree spec depth must be >= 1")
        spec = cls(**values)
        if spec.entries > MAX_ENTRIES:
            raise TreeSpecError(f"tree spec of {spec.entries:,} entries (dirs + files + symlinks): more than the "
                                f"limit of {MAX_ENTRIES:,}")
        return spec

    @property
    def entries(self) -> int:
        return self.dirs + self.files + self.symlinks

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@dataclass(frozen=True)
class TreeEntry:
    path: str            # relative to the tree root, "/"-separated
    kind: str            # "dir", "file", "symlink"
    mode: int            # permission bits
    mtime_ns: int
    size: int = 0
    target: str = ""     # symlinks


def _name(rng: random.Random, taken: set[str], ext: str = "") -> str:
    while True:
        stem = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.3:
            stem += rng.choice("-_") + str(rng.randint(0, 99))
        name = stem + ext
        if name not in taken and name not in (".", ".."):
            taken.add(name)
            return name


def _size(rng: random.Random, max_size: int) -> int:
    if rng.random() < 0.05:
        return 0
    return min(max_size, int(rng.lognormvariate(7.0, 1.6)))


class _OrderedSubset:
    """A subset of 0..n-1 as a sequence in increasing order, with O(log n) add, discard, len and
    indexing (a Fenwick tree of membership bits): ``random.choice`` on it draws exactly what it would
    draw on the equivalent list."""

    def __init__(self, n: int):
        self.n = n
        self.tree = [0] * (n + 1)
        self.member = bytearray(n)
        self.count = 0
        self.top = 1 << max(0, n.bit_length() - 1) if n else 0

    def _update(self, i: int, delta: int) -> None:
        i += 1
        while i <= self.n:
            self.tree[i] += delta
            i += i & -i

    def add(self, i: int) -> None:
        if not self.member[i]:
            self.member[i] = 1
            self.count += 1
            self._update(i, 1)

    def discard(self, i: int) -> None:
        if self.member[i]:
            self.member[i] = 0
            self.count -= 1
            self._update(i, -1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> int:
        """The k-th member (0-based) in increasing order."""
        if not 0 <= k < self.count:
            raise IndexError(k)
        pos, rest, step = 0, k + 1, self.top
        while step:
            nxt = pos + step
            if nxt <= self.n and self.tree[nxt] < rest:
                pos = nxt
                rest -= self.tree[nxt]
            step >>= 1
        return pos          # 0-based index of the member (1-based position pos + 1)


class SyntheticTree:
    """The entries of one spec, in creation order (the root itself is not listed)."""

    def __init__(self, spec: TreeSpec | str):
        self.spec = TreeSpec.parse(spec) if isinstance(spec, str) else spec
        self.entries: list[TreeEntry] = []
        self._generate()

    def __len__(self) -> int:
        return len(self.entries)

    def _mtime(self, rng: random.Random) -> int:
        return (EPOCH + rng.randrange(0, 365 * 86400)) * 1_000_000_000 + rng.randrange(0, 1_000_000_000)

    def _generate(self) -> None:
        s = self.spec
        rng = random.Random(f"tlslab-tree:{s.seed}")
        dirs: list[tuple[str, int]] = [("", 0)]          # (path, depth)
        names: dict[str, set[str]] = {"": set()}
        subdirs: list[int] = [0]                         # per dirs index
        # The parent of each new directory is drawn uniformly from the directories, in creation order,
        # that are shallower than depth and have fewer than fanout subdirectories (else from all the
        # shallower ones). Both lists are kept up to date instead of rebuilt per directory, so a tree
        # of n directories costs O(n log n), not O(n^2); the draws are the same as rebuilding them.
        shallow = [0]                                    # indices of dirs with depth < s.depth
        open_ = _OrderedSubset(s.dirs + 1)               # ... and fewer than fanout subdirectories
        if s.fanout > 0:
            open_.add(0)
        for _ in range(s.dirs):
            k = rng.choice(open_) if len(open_) else rng.choice(shallow)
            parent, depth = dirs[k]
            path = posixpath.join(parent, _name(rng, names[parent]))
            index = len(dirs)
            dirs.append((path, depth + 1))
            names[path] = set()
            subdirs.append(0)
            subdirs[k] += 1
            if subdirs[k] == s.fanout:
                open_.discard(k)
            if depth + 1 < s.depth:
                shallow.append(index)
                if s.fanout > 0:
                    open_.add(index)
            self.entries.append(TreeEntry(path, "dir", 0o755, self._mtime(rng)))
        files = []
        for _ in range(s.files):
            parent = rng.choice(dirs)[0]
            ext = rng.choice(TEXT_EXTS + BIN_EXTS)
            path = posixpath.join(parent, _name(rng, names[parent], ext))
            mode = 0o755 if rng.random() < 0.1 else 0o644
            files.append(path)
            self.entries.append(TreeEntry(path, "file", mode, self._mtime(rng), size=_size(rng, s.max_size)))
        for _ in range(s.symlinks):
            parent = rng.choice(dirs)[0]
            path = posixpath.join(parent, _name(rng, names[parent]))
            if rng.randrange(100) < s.dangling or not files:
                target = rng.choice(("missing-", "../nowhere/", "./gone/")) + _name(rng, set())
            else:
                dest = rng.choice(files) if rng.random() < 0.8 else rng.choice(dirs)[0]
                target = posixpath.relpath(dest or ".", parent or ".")
            self.entries.append(TreeEntry(path, "symlink", 0o777, self._mtime(rng), target=target))
        self.root_mtime_ns = self._mtime(rng)

    # ------------------------------------------------------------ contents
    def content(self, entry: TreeEntry) -> bytes:
        """The bytes of a file entry: text lines or random bytes, fixed by seed and path.

        Text is lines of 1-12 words drawn uniformly from WORDS, defined by
        :func:`_text_reference` (``random.randint`` / ``random.choice``);
        this is the same draw sequence done with ``getrandbits`` directly,
        ~4x faster (a 4k tree has 4 MB of text; tests pin the two together).
        """
        rng = random.Random(f"tlslab-file:{self.spec.seed}:{entry.path}")
        if entry.path.endswith(TEXT_EXTS):
            return _text_fast(rng, entry.size)
        return rng.randbytes(entry.size)

    # ------------------------------------------------------------ guest view
    def build(self, first_ino: int = 2) -> N.Dir:
        """The tree as in-memory nodes (root inode ``first_ino``, then creation order)."""
        root = N.Dir(first_ino, N.S_IFDIR | 0o755, mtime_ns=self.root_mtime_ns)
        by_path: dict[str, N.Dir] = {"": root}
        ino = first_ino
        for e in self.entries:
            ino += 1
            parent_path, name = posixpath.split(e.path)
            parent = by_path[parent_path]
            if e.kind == "dir":
                node = N.Dir(ino, N.S_IFDIR | e.mode, mtime_ns=e.mtime_ns)
                by_path[e.path] = node
            elif e.kind == "file":
                node = N.File(ino, N.S_IFREG | e.mode, source=lambda e=e: self.content(e), size=e.size,
                              mtime_ns=e.mtime_ns)
            else:
                node = N.Symlink(ino, e.target.encode(), mtime_ns=e.mtime_ns)
            parent.attach(name.encode(), node)
        return root

    # ------------------------------------------------------------ host copy
    def create_entry(self, e: TreeEntry, dest: str) -> None:
        """Create one entry (directory, file with its content, or symlink) under ``dest``."""
        full = os.path.join(dest, e.path)
        if e.kind == "dir":
            os.mkdir(full)
        elif e.kind == "file":
            with open(full, "wb") as f:
                f.write(self.content(e))
        else:
            os.symlink(e.target, full)

    def materialise(self, dest: str | os.PathLike) -> str:
        """Write the identical tree under ``dest`` (created; must not exist or be empty)."""
        dest = os.fspath(dest)
        os.makedirs(dest, exist_ok=True)
        if os.listdir(dest):
            raise FileExistsError(f"{dest} is not empty")
        for e in self.entries:
            self.create_entry(e, dest)
        # modes and mtimes last, deepest first, so creating children does not touch them
        for e in reversed(self.entries):
            full = os.path.join(dest, e.path)
            if e.kind != "symlink":
                os.chmod(full, e.mode)
            os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        os.chmod(dest, 0o755)
        os.utime(dest, ns=(self.root_mtime_ns, self.root_mtime_ns))
        return dest


def _text_reference(rng: random.Random, size: int) -> bytes:
    """The definition of a text file's bytes (slow: one method call per draw)."""
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _text_fast(rng: random.Random, size: int) -> bytes:
    """``_text_reference`` with CPython's rejection sampling (``_randbelow``) inlined."""
    getrandbits = rng.getrandbits
    words = WORDS
    nwords = len(words)
    kw = nwords.bit_length()
    out, n = [], 0
    while n < size:
        r = getrandbits(4)          # randint(1, 12) = 1 + randbelow(12); 12 has 4 bits
        while r >= 12:
            r = getrandbits(4)
        line = []
        for _ in range(r + 1):
            w = getrandbits(kw)     # choice(words) = words[randbelow(len(words))]
            while w >= nwords:
                w = getrandbits(kw)
            line.append(words[w])
        text = " ".join(line) + "\n"
        out.append(text)
        n += len(text)
    return "".join(out).encode()[:size]
