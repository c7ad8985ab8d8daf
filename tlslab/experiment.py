"""One experiment cell: a guest, its arguments, a filesystem, a strategy -> a run.

``RunSpec`` is plain data (JSON-able) so that benchmark cells, the CLI and the
hardware backend describe a run the same way; ``execute`` composes the layers
(guest registry -> Linux process -> hypervisor domain) and runs it.

Filesystems. Without a root filesystem the guest's ``/`` is the data tree (a
synthetic ``--tree`` or a host ``--root``), as for every static guest so far.
With ``rootfs`` (the pinned Debian i386 root, ``tlslab rootfs``) the guest's
``/`` is that root, read-only; a program named by an absolute path that exists
in it is taken from it, ld.so and every library always are; a data tree, if
one is given, is mounted at ``tree_at`` and is the working directory. A
dynamically linked guest without ``rootfs`` gets the default root (``debian``):
its libraries have to come from somewhere, and never from the host.

Environment: ``DEFAULT_ENV``, plus ``LC_ALL=C`` under a root filesystem (the
root has no locales; Keir's benchmark is about the C locale's code paths),
then ``env`` overrides (``K=V``; ``K=`` with nothing after it removes K).
The effective environment is part of the run record.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tlslab.artifacts import bundled_path
from tlslab.guests import GuestBinary, GuestError, resolve_guest, sha256_file
from tlslab.hypervisor.domain import Domain, RunResult
from tlslab.hypervisor.strategies import get_strategy, option_names
from tlslab.linux import nodes as N
from tlslab.linux.dynlink import check_dependencies
from tlslab.linux.elf import parse_elf
from tlslab.linux.errno import SyscallError
from tlslab.linux.process import DEFAULT_ENV, Process
from tlslab.linux.tree import TreeSpec
from tlslab.linux.vfs import Vfs, data_tree

DEFAULT_TREE = "small"
DEFAULT_ROOTFS = "debian"
DEFAULT_TREE_AT = "/data"
ROOTFS_ENV = (b"LC_ALL=C",)
MOUNT_DEV = (8, 17)  # st_dev of a data tree mounted inside a root filesystem (its own filesystem)


@dataclass(frozen=True)
class RunSpec:
    guest: str                      # registry name (lsr, lsr.nosegneg, busybox) or a path
    args: tuple[str, ...] = ()      # argv[1:]
    strategy: str = "native"
    profile: str = "nonpae"         # hypervisor profile (nonpae | pae)
    tree: str | None = DEFAULT_TREE  # synthetic tree spec or name; ignored if root is set
    root: str | None = None         # host directory to show read-only instead
    seed: int = 0
    stdout: str = "pipe"            # pipe | file | null | tty
    variant: str = "default"
    applet: str | None = None       # busybox: argv[0] name
    timeout_seconds: float = 0
    patch_policy: str = "auto"      # rewrite strategies: auto | lib | exe | all | none
    page_sharing: str = ""          # patching strategies: shared page-cache pages, private copies, "" = its default
    fs_abi: bool = False            # install the fs-twin ABI (statically rewritten binaries) under any strategy
    rootfs: str | None = None       # pinned root filesystem (debian); dynamic guests get DEFAULT_ROOTFS
    tree_at: str = DEFAULT_TREE_AT  # under a root filesystem: where the data tree is mounted (and the cwd)
    env: tuple[str, ...] = ()       # K=V overrides of the fixed environment
    prices: str = "hw-vm"           # online strategies: the cost profile their decisions weigh
    emulate_ns: float = 0.0         # online strategies: replace that profile's emulate price (0: keep)
    flip_ns: float = 0.0            # online strategies: replace that profile's flip price (0: keep)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Program:
    """What a RunSpec runs: the binary, the path the guest knows it by, argv[0], its root."""

    guest: GuestBinary
    guest_path: str
    argv0: str
    rootfs: str | None
    root_dir: Path | None


def rootfs_dir(name: str) -> Path:
    """The materialised root filesystem ``name`` (never downloads: `tlslab rootfs fetch` does)."""
    from tlslab import rootfs

    return rootfs.materialise(name, fetch=False)


def resolve_program(spec: RunSpec) -> Program:
    """Find the binary: in the root filesystem for absolute guest paths, else the guest registry."""
    if spec.rootfs and spec.guest.startswith("/"):
        root = rootfs_dir(spec.rootfs)
        vfs = Vfs.from_host(root, map_owner=False)
        try:
            node = vfs.resolve(os.fsencode(spec.guest))
        except SyscallError as exc:
            raise GuestError(f"{spec.guest}: not in the {spec.rootfs} root filesystem ({exc})") from None
        if not isinstance(node, N.File) or node.host_path is None:
            raise GuestError(f"{spec.guest}: not a regular file in the {spec.rootfs} root filesystem")
        path = Path(os.fsdecode(node.host_path))
        guest = GuestBinary(os.path.basename(spec.guest), f"rootfs:{spec.rootfs}", path, sha256_file(path))
        return Program(guest, spec.guest, spec.applet or spec.guest, spec.rootfs, root)
    guest = resolve_guest(spec.guest, spec.variant)
    argv0 = spec.applet or guest.name
    rootfs = spec.rootfs
    if rootfs is None and parse_elf(guest.path)[1].dynamic:
        rootfs = DEFAULT_ROOTFS
    return Program(guest, "/bin/" + argv0, argv0, rootfs, rootfs_dir(rootfs) if rootfs else None)


def environment(spec: RunSpec, rootfs: str | None) -> list[bytes]:
    """The guest's environment (see the module docstring): fixed, then overridden."""
    env: dict[bytes, bytes] = {}
    for entry in (*DEFAULT_ENV, *(ROOTFS_ENV if rootfs else ())):
        key, _, value = entry.partition(b"=")
        env[key] = value
    for item in spec.env:
        key, sep, value = os.fsencode(item).partition(b"=")
        if not sep or not key:
            raise GuestError(f"--env {item!r}: expected KEY=VALUE")
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return [k + b"=" + v for k, v in env.items()]


def host_directory(path: str) -> str:
    """A ``root`` data directory: as given, or (relative and not found from here) in the repository.

    Specs name bundled data such as ``guests/boot`` relative to the checkout, so
    a cell's identity does not depend on where the checkout lives.
    """
    if os.path.isabs(path) or os.path.isdir(path):
        return path
    candidate = bundled_path(path)
    return str(candidate) if candidate is not None and candidate.is_dir() else path


def build_vfs(spec: RunSpec, program: Program | None = None) -> Vfs:
    if program is None or program.root_dir is None:
        if spec.root:
            return Vfs.from_host(host_directory(spec.root), seed=spec.seed)
        return Vfs.from_tree(TreeSpec.parse(spec.tree or DEFAULT_TREE), seed=spec.seed)
    vfs = Vfs.from_host(program.root_dir, map_owner=False, seed=spec.seed, list_specials=True)
    if spec.root or spec.tree:
        tree = data_tree(host_dir=host_directory(spec.root)) if spec.root else data_tree(TreeSpec.parse(spec.tree))
        if not spec.root:
            _set_dev(tree, MOUNT_DEV)
        try:
            mounted = vfs.mount(os.fsencode(spec.tree_at), tree)
        except (SyscallError, ValueError) as exc:
            raise GuestError(f"cannot mount the data tree at {spec.tree_at}: {exc}") from None
        vfs.cwd = mounted
    return vfs


def _set_dev(d: N.Dir, dev: tuple[int, int]) -> None:
    stack = [d]
    while stack:
        node = stack.pop()
        node.dev = dev
        if isinstance(node, N.Dir):
            stack.extend(node.entries.values())


def strategy_for(spec):
    """The strategy ``spec`` names, made from the spec's options: the run spec carries every strategy's
    options and each strategy takes the ones it declares ("" for page_sharing: the strategy's own default,
    shared for rewrite and rewrite-2004, private for online-patch). StrategyOptionError for a bad option."""
    return get_strategy(spec.strategy, **{name: getattr(spec, name) for name in option_names(spec.strategy)
                                          if hasattr(spec, name) and getattr(spec, name) != ""})


def make_domain(spec: RunSpec, **domain_options) -> tuple[Domain, GuestBinary]:
    program = resolve_program(spec)
    guest = program.guest
    envp = environment(spec, program.rootfs)

    def factory(vcpu, policy):
        vfs = build_vfs(spec, program)
        process = Process(vcpu, guest.path, argv=[program.argv0, *spec.args], envp=envp, vfs=vfs,
                          seed=spec.seed, descriptor_policy=policy, stdout=spec.stdout,
                          guest_path=program.guest_path)
        image = parse_elf(guest.path)[1]
        if image.dynamic:
            check_dependencies(vfs, image, envp)
        process.load()
        return process

    strategy = strategy_for(spec)
    domain = Domain(factory, strategy, profile=spec.profile, timeout_seconds=spec.timeout_seconds,
                    **domain_options)
    domain.program = program  # what ran: for run records (the root a dynamic guest got by default)
    if spec.fs_abi:
        from tlslab.hypervisor.strategies.rewrite import attach_fs_abi

        attach_fs_abi(domain)
    return domain, guest


def execute(spec: RunSpec) -> tuple[RunResult, GuestBinary]:
    domain, guest = make_domain(spec)
    return domain.run(), guest
