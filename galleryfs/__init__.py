"""galleryfs: a model gallery in an OCI registry, as a CLI and a lazy read-only FUSE mount."""

from __future__ import annotations

__version__ = "0.1.0"
