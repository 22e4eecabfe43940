"""Patch an unpacked pyfuse3 3.5.0 source tree so that readdir knows its directory
without opendir.

A file system that answers opendir with ENOSYS tells the kernel (Linux >= 5.1) that
directories need no open handle: it then sends no opendir/releasedir at all and keeps
listings in its own cache (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE), re-reading one when the
directory's mtime changes. libfuse passes readdir the directory's inode for that case,
but pyfuse3 hands `Operations.readdir` only the file handle, which is then 0. The patch
passes the inode as the handle when the kernel sent none, and marks the build so that
galleryfs can check for it (`pyfuse3.READDIR_INODE_WITHOUT_OPENDIR`).

Usage: pyfuse3_patch.py SOURCE_DIR   (exits non-zero if the source is not the expected one)
"""

from __future__ import annotations

import sys
from pathlib import Path

VERSION = "3.5.0"
LOCAL = "+galleryfs.1"
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


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"pyfuse3_patch: {path}: expected text found {text.count(old)} times")
    path.write_text(text.replace(old, new))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    src = Path(argv[1])
    pkg = src / "src" / "pyfuse3"
    replace_once(src / "PKG-INFO", f"\nVersion: {VERSION}\n", f"\nVersion: {VERSION}{LOCAL}\n")
    replace_once(pkg / "handlers.pxi", READDIRPLUS_OLD, READDIRPLUS_NEW)
    init = pkg / "__init__.pyx"
    init.write_text(init.read_text() + f"\n# Added by galleryfs's scripts/pyfuse3_patch.py\n"
                                       f"{MARKER} = True\n")
    stub = pkg / "__init__.pyi"
    stub.write_text(stub.read_text() + f"\n{MARKER}: bool\n")
    # The generated C would be used as is if present: build from the patched .pyx.
    (pkg / "__init__.c").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
