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
# Reading it on a file fills the disk cache with all of the file's chunks, verified
# (`galleryfs warm`), and answers with what that took, in fewer than 128 bytes (Python's
# first getxattr buffer: a longer answer would be asked for, and warmed, twice). Not listed.
WARM = b"user.galleryfs.warm"
