"""One retry policy for registry requests: temporary failures only, capped backoff."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERRORS = (httpx.TransportError,)


class RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


@dataclass
class RetryPolicy:
    attempts: int = 5
    base: float = 0.2
    cap: float = 5.0
    # Overall bound, so a dead registry turns into an error, not a hang. The caller's
    # stall deadline (deadline.py) bounds the whole loop too: no retry is started whose
    # backoff would outlast it.
    deadline: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.cap, self.base * 2**attempt)
        jittered = random.uniform(backoff / 2, backoff)
        if retry_after is not None:
            return min(self.cap, max(jittered, retry_after))
        return jittered


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    if parsed is None:
        return None
    return max(0.0, parsed.timestamp() - time.time())


async def with_retries(policy: RetryPolicy, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run `call`, retrying transport errors and RetryableStatus with backoff."""
    start = trio.current_time()
    attempt = 0
    while True:
        try:
            return await call()
        except (RetryableStatus, *TRANSIENT_ERRORS) as exc:
            attempt += 1
            retry_after = (
                retry_after_seconds(exc.response) if isinstance(exc, RetryableStatus) else None
            )
            delay = policy.delay(attempt, retry_after)
            now = trio.current_time()
            if (attempt >= policy.attempts or now - start + delay > policy.deadline
                    or now + delay >= trio.current_effective_deadline()):
                # Sleeping into the deadline would report a timeout; this error says more.
                raise
            log.debug("%s failed (%s); retry %d in %.2fs", what, exc, attempt, delay)
            await trio.sleep(delay)
