"""The galleryfs exception hierarchy.

    GalleryError                  anything the CLI reports as a one-line error
    ├── UsageError                bad input from the user (reference, path, option)
    ├── InvalidReference          an unparseable reference or digest
    ├── RegistryError             the registry answered, but not as hoped
    │   ├── AuthError             401/403: credentials missing or wrong
    │   ├── NotFound              404: unknown gallery, model, tag, blob
    │   ├── BlobMissing           404 for a blob a listed file names: damage, not absence
    │   └── TooLarge              a manifest over the cap, a blob over its descriptor
    ├── RegistryUnavailable       no answer: connection refused, TLS failure, timeout
    ├── DigestMismatch            bytes that do not hash to the digest that named them
    ├── Unsigned                  no signature by a trusted key (or a registry that wants one)
    └── UnsupportedContent        a layer or manifest kind galleryfs cannot serve yet
"""

from __future__ import annotations


class GalleryError(Exception):
    """An error the user can act on; the CLI prints it on one line."""

    exit_code = 1


class UsageError(GalleryError):
    exit_code = 2


class InvalidReference(UsageError):
    pass


class RegistryError(GalleryError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class BlobMissing(RegistryError):
    """The registry has no blob for a file its manifest lists. Not a NotFound: the file
    exists in the listing, so reading it fails as damage (EIO), not as absence (ENOENT)."""


class TooLarge(RegistryError):
    pass


class RegistryUnavailable(GalleryError):
    pass


class DigestMismatch(GalleryError):
    pass


class UnsupportedContent(GalleryError):
    pass


class Unsigned(GalleryError):
    """A revision no trusted key signed (`galleryfs verify`, the mount's
    `--require-signed-by`), or a registry that serves only signed artifacts (Harbor's 412)."""


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The cause to report from a nursery's exception group: the first GalleryError,
    else the first leaf that is not a cancellation (trio groups concurrent failures)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, GalleryError):
            return leaf
    for leaf in leaves:
        if type(leaf).__name__ != "Cancelled":  # trio.Cancelled, without importing trio here
            return leaf
    return leaves[0] if leaves else group
