"""The options of the rewrite strategies, kept apart so the CLI can offer them without loading a strategy.

See :mod:`tlslab.hypervisor.strategies.rewrite` for what each policy allows.
"""

PATCH_POLICIES = ("auto", "lib", "exe", "all", "none")
PAGE_SHARING = ("shared", "private")
DEFAULT_PATCH_DIR = "/lib"


def check_patch_options(patch_policy: str, page_sharing: str) -> None:
    """The options both rewrite strategies take (one-line ValueError)."""
    if patch_policy not in PATCH_POLICIES:
        raise ValueError(f"patch policy {patch_policy!r} is not one of {', '.join(PATCH_POLICIES)}")
    if page_sharing not in PAGE_SHARING:
        raise ValueError(f"page sharing {page_sharing!r} is not one of {', '.join(PAGE_SHARING)}")
