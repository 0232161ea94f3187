"""The set of running portal pollers, and how a new config changes it.

A reload keeps every portal whose settings did not change as it is (its bucket, budget,
last samples and schedule), stops removed or changed portals, and starts new ones, so a
reload never causes a burst of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from exporter.config import Config, Portal
from exporter.poller import Handover, PortalPoller
from exporter.render import Publisher

log = logging.getLogger(__name__)


@dataclass
class _Running:
    portal: Portal
    poller: PortalPoller
    task: asyncio.Task[None]


class Supervisor:
    """Starts, keeps and stops one `PortalPoller` per portal of the current config."""

    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        publisher: Publisher,
        *,
        poller_factory: Callable[..., PortalPoller] = PortalPoller,
    ) -> None:
        self.config = config
        self._session = session
        self.publisher = publisher
        self._factory = poller_factory
        self._running: dict[str, _Running] = {}

    @property
    def pollers(self) -> dict[str, PortalPoller]:
        return {name: r.poller for name, r in self._running.items()}

    def start(self) -> None:
        for portal in self.config.portals:
            self._start(portal)

    def _start(self, portal: Portal, handover: Handover | None = None) -> None:
        poller = self._factory(
            portal, self.config, self._session, self.publisher.publish, handover=handover
        )
        task = asyncio.create_task(poller.run(), name=f"poll-{portal.name}")
        task.add_done_callback(self._crashed)
        self._running[portal.name] = _Running(portal, poller, task)

    async def run_once(self) -> None:
        """One cycle of every portal, each snapshot published (for --once)."""
        pollers = [
            self._factory(p, self.config, self._session, self.publisher.publish)
            for p in self.config.portals
        ]
        for snapshot in await asyncio.gather(*(p.cycle() for p in pollers)):
            self.publisher.publish(snapshot)

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("poller %s stopped: %r", task.get_name(), task.exception())

    async def apply(self, config: Config) -> None:
        """Switch to `config`, touching only the portals that changed."""
        old = self.config
        self.config = config
        global_change = (old.poll_interval, old.stale_after, old.request_timeout) != (
            config.poll_interval,
            config.stale_after,
            config.request_timeout,
        ) or old.user_refresh_interval != config.user_refresh_interval
        wanted = {p.name: p for p in config.portals}
        replaced: dict[str, Handover] = {}
        for name in list(self._running):
            running = self._running[name]
            if name not in wanted or wanted[name] != running.portal or global_change:
                await self._stop(name, drop_series=name not in wanted)
                replaced[name] = running.poller.handover()
        for name, portal in wanted.items():
            if name not in self._running:
                self._start(portal, handover=replaced.get(name))
        changed = sorted(n for n in replaced if n in wanted)
        log.info(
            "portals after reload: %d running; replaced: %s; removed: %s",
            len(self._running),
            ", ".join(changed) or "none",
            ", ".join(sorted(set(replaced) - set(wanted))) or "none",
        )

        self.publisher.info.poll_interval = config.poll_interval
        self.publisher.touch()

    async def _stop(self, name: str, *, drop_series: bool, grace: float = 0.0) -> None:
        running = self._running.pop(name)
        if grace > 0:
            await asyncio.wait([running.task], timeout=grace)
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.task
        if drop_series:
            self.publisher.remove(name)

    async def stop(self, *, grace: float = 3.0) -> None:
        """Stop polling; cycles in flight get `grace` seconds to finish their requests."""
        started = time.monotonic()
        for running in self._running.values():
            running.poller.stop()  # a sleeping poller ends at once, a busy one after its cycle
        tasks = [r.task for r in self._running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for name in list(self._running):
            await self._stop(name, drop_series=False)
        log.debug("pollers stopped in %.2fs", time.monotonic() - started)

    def ready(self) -> tuple[bool, list[str]]:
        """Whether every portal finished its first cycle; the names of those that did not."""
        waiting = [name for name in self._running if name not in self.publisher.rendered]
        return not waiting, waiting
