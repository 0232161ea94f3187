"""The HTTP side: `/metrics`, `/healthz`, `/readyz`, `/`, `/alerts/{name}` and the lifecycle.

`/metrics` hands out bytes the publisher rendered after the last poll cycle; no request
here ever waits on Bitrix24 or renders metrics. A `cleanup_ctx` opens the HTTP session,
starts the pollers and the publisher, and on shutdown stops polling, lets requests in
flight finish for a few seconds and closes the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator

from aiohttp import payload, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import StreamWriter
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE

from exporter import __version__, heap
from exporter.alerts.wiring import ALERT_ROUTES, add_alert_routes
from exporter.bitrix import new_session
from exporter.config import Config, ConfigError
from exporter.render import ExporterInfo, Publisher
from exporter.statusbook import StatusBook
from exporter.statuspage import render_page
from exporter.supervisor import Supervisor

log = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SUPERVISOR = web.AppKey("supervisor", Supervisor)
PUBLISHER = web.AppKey("publisher", Publisher)
STATUS_BOOK = web.AppKey("status_book", StatusBook)
LOADER: web.AppKey[Callable[[], Config]] = web.AppKey("loader")


def wants_openmetrics(accept: str) -> bool:
    """Content negotiation as prometheus_client does it: OpenMetrics only when asked for."""
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media != "application/openmetrics-text":
            continue
        version = next((p.split("=", 1)[1] for p in params if p.startswith("version=")), "")
        if version in ("", "0.0.1", "1.0.0"):
            return True
    return False


def accepts_gzip(accept_encoding: str) -> bool:
    return any(part.split(";")[0].strip() == "gzip" for part in accept_encoding.split(","))


async def metrics_handler(request: web.Request) -> web.Response:
    exposition = request.app[PUBLISHER].current
    assert exposition is not None
    openmetrics = wants_openmetrics(request.headers.get("Accept", ""))
    gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    if openmetrics:
        parts = (exposition.openmetrics_gzip,) if gzipped else exposition.openmetrics_parts
        content_type = OM_CONTENT_TYPE
    else:
        parts = (exposition.text_gzip,) if gzipped else exposition.text_parts
        content_type = TEXT_CONTENT_TYPE
    response = web.Response(
        body=Parts(parts, content_type=content_type), headers={"Vary": "Accept, Accept-Encoding"}
    )
    if gzipped:
        response.headers["Content-Encoding"] = "gzip"
    return response


FIRST_WRITE = 16 * 1024
WRITE_SIZE = 1024 * 1024
JOIN_SIZE = 64 * 1024
BUFFER_LIMIT = 16 * 1024 * 1024


def slices(
    parts: Iterable[bytes], first: int, size: int, join: int = JOIN_SIZE
) -> Iterator[bytes | memoryview]:
    """The parts as pieces to write. A part of `join` bytes or more is cut into views of it
    (never copied): at most `first` bytes if it opens the body, else at most `size`. Runs
    of smaller parts (many portals' blocks) are joined into pieces of about `join` bytes,
    so that no piece is tiny and no copy is big (a copy of 1 MiB per scrape was a fresh
    mapping, paid in page faults).

    >>> [bytes(p) for p in slices([b"abcdef", b"g", b"h", b"ij", b"klmnopq"], 4, 5, join=3)]
    [b'abcd', b'ef', b'ghij', b'klmno', b'pq']
    """
    pending: list[bytes] = []
    held = 0
    limit = first
    for part in parts:
        if not part:
            continue
        if len(part) < join:
            pending.append(part)
            held += len(part)
            if held >= join:
                yield b"".join(pending)
                pending, held, limit = [], 0, size
            continue
        if pending:
            yield b"".join(pending)
            pending, held, limit = [], 0, size
        view = memoryview(part)
        while view:
            yield view[:limit]
            view, limit = view[limit:], size
    if pending:
        yield b"".join(pending)


class Parts(payload.Payload):
    """A body sent as its parts one after the other (the plain bodies share sample lines)."""

    def __init__(self, parts: tuple[bytes, ...], *, content_type: str) -> None:
        super().__init__(parts, content_type=content_type)
        self._parts = parts
        self._size = sum(len(part) for part in parts)

    async def write(self, writer: AbstractStreamWriter) -> None:
        # aiohttp joins the headers with the first write: a small one, so that the join does
        # not copy a big part. Then slices of at most 1 MiB, waiting for the socket only
        # once 16 MiB are buffered: waiting after every slice stalled concurrent scrapes of
        # a multi-MB body (8 clients: 120 -> 85 plain-text scrapes/s at 100,000 series).
        for piece in slices(self._parts, FIRST_WRITE, WRITE_SIZE):
            if isinstance(writer, StreamWriter):
                await writer.write(piece, LIMIT=BUFFER_LIMIT)
            else:
                await writer.write(piece)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._parts).decode(encoding, errors)


async def healthz_handler(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz_handler(request: web.Request) -> web.Response:
    ready, waiting = request.app[SUPERVISOR].ready()
    if ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"waiting for the first cycle of: {', '.join(waiting)}\n")


async def reload_config(app: web.Application) -> tuple[bool, str]:
    """Re-read the config; a bad one keeps the running one and says why."""
    if LOADER not in app:
        return False, "reload is not available: the exporter was not started from a config file"
    publisher = app[PUBLISHER]
    loop = asyncio.get_running_loop()
    try:
        config = await loop.run_in_executor(None, app[LOADER])
    except ConfigError as error:
        publisher.info.reload_successful = False
        publisher.touch()
        await publisher.flush()
        for problem in error.problems:
            log.error("reload failed, keeping the running config: %s", problem)
        return False, str(error)
    await app[SUPERVISOR].apply(config)
    if ALERT_ROUTES in app:
        app[ALERT_ROUTES].apply(config.alert_receivers)
    publisher.info.reload_successful = True
    publisher.info.reload_timestamp = time.time()
    publisher.touch()
    await publisher.flush()
    log.info("config reloaded: %d portals", len(config.portals))
    return True, f"reloaded: {len(config.portals)} portals"


async def reload_handler(request: web.Request) -> web.Response:
    ok, message = await reload_config(request.app)
    return web.Response(status=200 if ok else 500, text=message + "\n")


async def landing_handler(request: web.Request) -> web.Response:
    """The status page: built from what is in memory, so it never waits on Bitrix24."""
    supervisor = request.app[SUPERVISOR]
    publisher = request.app[PUBLISHER]
    book = request.app[STATUS_BOOK]
    running = supervisor.pollers
    book.forget(running)
    view = book.view(
        portals=[poller.portal for poller in running.values()],
        snapshots=publisher.snapshots,
        poll_interval=supervisor.config.poll_interval,
        version=__version__,
        reload_ok=publisher.info.reload_successful,
        reload_at=publisher.info.reload_timestamp,
        shard=publisher.info.shard,
    )
    # "replace": an error text from the portal may hold a lone surrogate ("\ud800" is valid
    # JSON), which strict UTF-8 cannot encode.
    body = render_page(view).encode("utf-8", "replace")
    return web.Response(body=body, content_type="text/html", charset="utf-8")


def build_app(
    config: Config,
    *,
    info: ExporterInfo | None = None,
    loader: Callable[[], Config] | None = None,
    middlewares: tuple[Callable[..., Awaitable[web.StreamResponse]], ...] = (),
    shutdown_grace: float = 3.0,
    basic_auth: Callable[[], bool] = lambda: False,
) -> web.Application:
    """The exporter as an aiohttp application; polling starts with the app.

    `basic_auth` tells whether the web config's basic auth protects every request now.
    """
    heap.tune_malloc()  # before the render thread exists
    app = web.Application(middlewares=list(middlewares))
    app[PUBLISHER] = Publisher(info or ExporterInfo(poll_interval=config.poll_interval))
    app[STATUS_BOOK] = StatusBook()
    app[PUBLISHER].listeners.append(app[STATUS_BOOK].observe)
    add_alert_routes(
        app,
        config.alert_receivers,
        lambda: app.get(SUPERVISOR),
        app[PUBLISHER],
        basic_auth=basic_auth,
    )

    if loader is not None:
        app[LOADER] = loader

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        session = new_session()
        publisher = app[PUBLISHER]
        publisher.info.reload_timestamp = publisher.info.reload_timestamp or time.time()
        supervisor = Supervisor(config, session, publisher)
        app[SUPERVISOR] = supervisor
        render_task = asyncio.create_task(publisher.run(), name="publisher")
        supervisor.start()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[tuple[bool, str]]] = set()

        def on_sighup() -> None:
            task = asyncio.create_task(reload_config(app))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            await supervisor.stop(grace=shutdown_grace)
            render_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await render_task
            await session.close()
            log.info("stopped")

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/", landing_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/readyz", readyz_handler)
    app.router.add_post("/-/reload", reload_handler)
    return app
