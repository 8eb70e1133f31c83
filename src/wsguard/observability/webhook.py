"""Posting alerts to a webhook: never on the event loop's critical path.

Alerts are queued (bounded) and posted by one background task with an
``httpx.AsyncClient``: a timeout on every attempt, retries with exponential
back-off, and at most one post per rule per cool-down (firings in between are
counted and reported as ``suppressed`` in the next post).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("wsguard.alerts")

QUEUE_LIMIT = 100


class _HiddenUrl(logging.Filter):
    """httpx logs every request's URL at INFO: a webhook's URL is a credential (Slack's,
    Teams' and Discord's carry the secret in the path; others in the query or user
    info), so the records about this one show its scheme and host only."""

    def __init__(self, url: str) -> None:
        super().__init__()
        from urllib.parse import urlsplit

        self.url = url
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
        self.shown = f"{parts.scheme}://{host}{port}/…"

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(str(arg) == self.url for arg in args):
            record.args = tuple(self.shown if str(arg) == self.url else arg for arg in args)
        return True


class Webhook:
    """Delivers alert documents to one URL."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retries: int,
        clock: Callable[[], float],
        on_result: Callable[[str], None],
        backoff: float = 0.5,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._retries = retries
        self._clock = clock
        self._on_result = on_result
        self._backoff = backoff
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_post: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._closed = False

    def submit(self, rule: str, cooldown: float, document: dict[str, Any]) -> bool:
        """Queue *document* unless *rule* was posted less than *cooldown* seconds ago."""
        if self._closed:
            return False
        now = self._clock()
        last = self._last_post.get(rule)
        if last is not None and now - last < cooldown:
            self._suppressed[rule] = self._suppressed.get(rule, 0) + 1
            self._on_result("suppressed")
            return False
        self._last_post[rule] = now
        suppressed = self._suppressed.pop(rule, 0)
        if suppressed:
            document = {**document, "suppressed": suppressed}
        if self._queue is None:
            self._queue = asyncio.Queue(QUEUE_LIMIT)
            self._task = asyncio.get_running_loop().create_task(self._worker(self._queue))
        try:
            self._queue.put_nowait(document)
        except asyncio.QueueFull:
            self._on_result("failed")
            return False
        return True

    async def _worker(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        try:
            import httpx  # only nodes with a webhook pay for importing it

            async with (
                httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client,
                _hidden_in_httpx_logs(str(httpx.URL(self.url))),
            ):
                while True:
                    document = await queue.get()
                    try:
                        ok = await self._post(client, document)
                    except Exception:  # a bug must not stop every later alert
                        logger.exception("alert webhook post failed")
                        ok = False
                    finally:
                        queue.task_done()
                    self._on_result("ok" if ok else "failed")
        except Exception:  # the client itself failed (e.g. a proxy setting): start over
            logger.exception("alert webhook sender stopped")
            while not queue.empty():
                queue.get_nowait()
                queue.task_done()
                self._on_result("failed")
            if self._queue is queue:
                self._queue, self._task = None, None  # the next alert starts a new sender

    async def _post(self, client: httpx.AsyncClient, document: dict[str, Any]) -> bool:
        import httpx

        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                async with asyncio.timeout(self._timeout):  # the whole attempt, not each read
                    response = await client.post(self.url, json=document)
                if response.status_code < 300:
                    return True
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    logger.warning("alert webhook refused the post: HTTP %d", response.status_code)
                    return False  # retrying will not change the answer
                problem = f"HTTP {response.status_code}"
            except TimeoutError:
                problem = "timeout"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                problem = type(exc).__name__
            if attempt < self._retries:
                await asyncio.sleep(delay)
                delay *= 2
        logger.warning("alert webhook failed after %d attempts: %s", self._retries + 1, problem)
        return False

    async def close(self, grace: float = 2.0) -> None:
        """Give queued posts *grace* seconds, then stop."""
        self._closed = True
        task, queue = self._task, self._queue
        if task is None or queue is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.join(), grace)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@contextlib.asynccontextmanager
async def _hidden_in_httpx_logs(url: str) -> AsyncIterator[None]:
    hidden = _HiddenUrl(url)
    logging.getLogger("httpx").addFilter(hidden)
    try:
        yield
    finally:
        logging.getLogger("httpx").removeFilter(hidden)
