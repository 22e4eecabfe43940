"""The extended attributes a galleryfs mount answers: names only, so that `unmount`
can ask for a flush without loading pyfuse3."""

from __future__ import annotations

DIGEST = b"user.galleryfs.digest"
MEDIATYPE = b"user.galleryfs.mediatype"
STATS = b"user.galleryfs.stats"
UNSUPPORTED = b"user.galleryfs.unsupported"
# Reading it on the mount root writes what the disk cache is owed (see writeback.py)
# and answers once done; `galleryfs unmount` reads it first. Not listed: `getfattr -d`
# should not wait on it.
FLUSH = b"user.galleryfs.flush"
