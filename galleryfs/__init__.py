"""galleryfs: a model gallery in an OCI registry, as a CLI and a lazy read-only FUSE mount."""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"


def _skip_httpx_cli() -> None:
    """Keep `import httpx` from importing httpx's own command-line tool.

    httpx imports it (with click, rich and pygments) whenever those happen to be
    installed, as they are on most ML machines (huggingface_hub brings click, typer brings
    rich): a noticeable share of every galleryfs command's start-up and of the mount
    daemon's memory, for a tool galleryfs never runs. Without them httpx installs the same
    kind of stand-in. tests/test_library_internals.py says when an httpx upgrade makes
    this stub miss, or needless.
    """
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    stub = types.ModuleType("httpx._main")

    def main() -> None:
        raise SystemExit("the httpx command line is not loaded inside galleryfs")

    stub.main = main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = stub


_skip_httpx_cli()
