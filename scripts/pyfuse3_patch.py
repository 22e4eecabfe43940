"""Patch an unpacked pyfuse3 3.5.0 source tree with two libfuse features it leaves out.

1. readdir without opendir. A file system that answers opendir with ENOSYS tells the
   kernel (Linux >= 5.1) that directories need no open handle: it then sends no
   opendir/releasedir at all and keeps listings in its own cache (FOPEN_CACHE_DIR |
   FOPEN_KEEP_CACHE), re-reading one when the directory's mtime changes. libfuse passes
   readdir the directory's inode for that case, but pyfuse3 hands `Operations.readdir`
   only the file handle, which is then 0. The patch passes the inode as the handle when
   the kernel sent none (marker: `pyfuse3.READDIR_INODE_WITHOUT_OPENDIR`).
2. FUSE_NOTIFY_RETRIEVE: `pyfuse3.notify_retrieve(inode, size, offset, cookie)` asks the
   kernel for bytes of a file that it holds in its page cache; they arrive, cut at the
   first page it does not hold, as `await Operations.retrieve_reply(cookie, inode,
   offset, data)`.

Usage: pyfuse3_patch.py SOURCE_DIR   (exits non-zero if the source is not the expected one)
"""

from __future__ import annotations

import sys
from pathlib import Path

VERSION = "3.5.0"
LOCAL = "+galleryfs.2"
MARKER = "READDIR_INODE_WITHOUT_OPENDIR"

READDIRPLUS_OLD = """    c.size = size
    c.off = off
    c.fh = fi.fh
    save_retval(fuse_readdirplus_async(c))
"""
READDIRPLUS_NEW = """    c.size = size
    c.off = off
    # galleryfs: opendir declined (ENOSYS) means no handle: readdir gets the inode.
    c.fh = fi.fh if fi.fh != 0 else ino
    save_retval(fuse_readdirplus_async(c))
"""

RETRIEVE_HANDLER = """

# galleryfs: the kernel's answer to notify_retrieve (it takes no reply).
cdef void fuse_retrieve_reply(fuse_req_t req, void *cookie, fuse_ino_t ino, off_t offset,
                              fuse_bufvec *bufv):
    data = PyBytes_from_bufvec(bufv)
    fuse_reply_none(req)
    save_retval(operations.retrieve_reply(<uintptr_t> cookie, ino, offset, data))
"""

RETRIEVE_FUNCTION = """

# Added by galleryfs's scripts/pyfuse3_patch.py
def notify_retrieve(fuse_ino_t inode, size_t size, off_t offset, uintptr_t cookie):
    '''Ask the kernel for up to *size* bytes of *inode* at *offset* from its page cache.

    They arrive as ``await operations.retrieve_reply(cookie, inode, offset, data)``, cut
    at the first page the kernel does not hold and at its maximum write size.
    '''
    cdef int ret
    with nogil:
        ret = fuse_lowlevel_notify_retrieve(session, inode, size, offset, <void *> cookie)
    if ret != 0:
        raise OSError(-ret, 'fuse_lowlevel_notify_retrieve returned: ' + strerror(-ret))

""" + MARKER + """ = True
"""

STUB = """
""" + MARKER + """: bool
def notify_retrieve(inode: int, size: int, offset: int, cookie: int) -> None: ...
"""


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"pyfuse3_patch: {path}: expected text found {text.count(old)} times")
    path.write_text(text.replace(old, new))


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    src = Path(argv[1])
    pkg = src / "src" / "pyfuse3"
    replace_once(src / "PKG-INFO", f"\nVersion: {VERSION}\n", f"\nVersion: {VERSION}{LOCAL}\n")
    replace_once(pkg / "handlers.pxi", READDIRPLUS_OLD, READDIRPLUS_NEW)
    append(pkg / "handlers.pxi", RETRIEVE_HANDLER)
    replace_once(pkg / "internal.pxi", "    fuse_ops.poll = fuse_poll\n",
                 "    fuse_ops.poll = fuse_poll\n"
                 "    fuse_ops.retrieve_reply = fuse_retrieve_reply\n")
    replace_once(pkg / "__init__.pyx", "from libc.stdint cimport uint32_t\n",
                 "from libc.stdint cimport uint32_t, uintptr_t\n")
    append(pkg / "__init__.pyx", RETRIEVE_FUNCTION)
    append(pkg / "__init__.pyi", STUB)
    # The generated C would be used as is if present: build from the patched .pyx.
    (pkg / "__init__.c").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
