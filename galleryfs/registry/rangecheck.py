"""What a registry's answer to a Range request must be, on either path to it.

Both the httpx path (`RegistryClient.open_blob`) and the direct one (`ranges`) ask for
bytes [start, end) and take the answer as exactly those bytes, so both hold it to the
same rule: status 206, `Content-Range: bytes start-(end-1)/total` with a total that can
hold that range (or `*`), and a `Content-Length`, when one is sent, of end - start. An
honest 206 for another range (a cache or proxy that aligns or clamps ranges) would
otherwise be served as the bytes asked for.
"""

from __future__ import annotations

import re

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def range_mismatch(status: int, content_range: str | None, content_length: int | str | None,
                   start: int, end: int | None) -> str | None:
    """Why this answer is not bytes [start, end) of the blob (end None: to its end),
    or None when it is."""
    if status != 206:
        return f"HTTP {status} to a Range request (the registry ignored the range)"
    m = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if m is None:
        return f"a 206 with Content-Range {content_range!r}"
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    want_last = end - 1 if end is not None else (int(total) - 1 if total != "*" else last)
    if (first, last) != (start, want_last):
        return f"asked for bytes {start}-{want_last}, the registry sent {content_range!r}"
    if total != "*" and last >= int(total):
        return f"Content-Range {content_range!r} ends past the blob's size"
    if content_length is not None and str(content_length).strip() != str(last - first + 1):
        return f"Content-Length {content_length!r} for Content-Range {content_range!r}"
    return None
