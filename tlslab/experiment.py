"""One experiment cell: a guest, its arguments, a filesystem, a strategy -> a run.

``RunSpec`` is plain data (JSON-able) so that benchmark cells, the CLI and the
hardware backend describe a run the same way; ``execute`` composes the layers
(guest registry -> Linux process -> hypervisor domain) and runs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tlslab.guests import GuestBinary, resolve_guest
from tlslab.hypervisor.domain import Domain, RunResult
from tlslab.hypervisor.strategies import get_strategy
from tlslab.linux.process import Process
from tlslab.linux.tree import TreeSpec
from tlslab.linux.vfs import Vfs

DEFAULT_TREE = "small"


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
    patch_policy: str = "exe"       # rewrite strategies: exe | all | none
    page_sharing: str = "shared"    # rewrite strategies: patches in shared page-cache pages or private copies
    fs_abi: bool = False            # install the fs-twin ABI (statically rewritten binaries) under any strategy

    def to_dict(self) -> dict:
        return asdict(self)


def build_vfs(spec: RunSpec, guest: GuestBinary) -> Vfs:
    if spec.root:
        return Vfs.from_host(spec.root, seed=spec.seed)
    return Vfs.from_tree(TreeSpec.parse(spec.tree or DEFAULT_TREE), seed=spec.seed)


def make_domain(spec: RunSpec, **domain_options) -> tuple[Domain, GuestBinary]:
    guest = resolve_guest(spec.guest, spec.variant)
    argv0 = spec.applet or guest.name

    def factory(vcpu, policy):
        process = Process(vcpu, guest.path, argv=[argv0, *spec.args], vfs=build_vfs(spec, guest),
                          seed=spec.seed, descriptor_policy=policy, stdout=spec.stdout,
                          guest_path="/bin/" + argv0)
        process.load()
        return process

    strategy = get_strategy(spec.strategy)
    for option in ("patch_policy", "page_sharing"):
        if hasattr(strategy, option):
            setattr(strategy, option, getattr(spec, option))
    domain = Domain(factory, strategy, profile=spec.profile, timeout_seconds=spec.timeout_seconds,
                    **domain_options)
    if spec.fs_abi:
        from tlslab.hypervisor.strategies.rewrite import attach_fs_abi

        attach_fs_abi(domain)
    return domain, guest


def execute(spec: RunSpec) -> tuple[RunResult, GuestBinary]:
    domain, guest = make_domain(spec)
    return domain.run(), guest
