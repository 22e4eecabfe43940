"""What the mount needs installed: galleryfs's build of pyfuse3.

scripts/setup builds pyfuse3 with scripts/pyfuse3/*.patch (each header says why; 0002, a
read's reply written without the GIL, is speed only and not checked here). The mount has
no code path for a plain pyfuse3: `galleryfs mount` checks first and fails with one line
that says what is missing and how to get it.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import GalleryError

# What the patch adds, and what the mount uses it for.
FEATURES = {
    "READDIR_INODE_WITHOUT_OPENDIR": "kernel-cached listings",
    "notify_retrieve": "the disk cache's write-behind",
}
HOW_TO_GET_IT = ("run scripts/setup in the galleryfs source tree, which builds pyfuse3 3.5.0 "
                 "with scripts/pyfuse3/*.patch")


class MissingRequirement(GalleryError):
    """The installed pyfuse3 cannot run the mount."""


def require_patched_pyfuse3(module: ModuleType | None = None) -> None:
    """Raise `MissingRequirement` unless `module` (default: the installed pyfuse3) has
    galleryfs's patch."""
    if module is None:
        try:
            import pyfuse3 as module
        except ImportError as exc:
            raise MissingRequirement(
                f"galleryfs mount needs pyfuse3 ({exc}): {HOW_TO_GET_IT}") from None
    missing = [f"pyfuse3.{name} ({use})" for name, use in FEATURES.items()
               if not hasattr(module, name)]
    if missing:
        raise MissingRequirement(
            f"galleryfs mount needs galleryfs's build of pyfuse3; this one lacks "
            f"{' and '.join(missing)}: {HOW_TO_GET_IT}")
