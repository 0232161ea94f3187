"""Many portals in one process: each has its own schedule, bucket and errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from exporter.fakeportal import Faults
from tests.conftest import (
    SECRET,
    config_of,
    make_portal,
    metrics_text,
    portal_config,
    series,
    value,
    wait_for,
)


def portal_entry(name: str, url: str) -> dict[str, Any]:
    return {"name": name, "webhook": f"{url}/rest/1/{SECRET}/", "tasks": {"users": "all"}}


async def test_slow_and_dead_portals_do_not_delay_others(served: Any, exporter_app: Any) -> None:
    """A portal answering in 1.5 s and one refusing connections leave a healthy one on schedule."""
    healthy, slow = make_portal(2), make_portal(2)
    slow.faults = Faults(latency=1.5)
    healthy_url, slow_url = await served(healthy), await served(slow)
    raw = portal_config(healthy_url, poll_interval="300ms", request_timeout="5s")
    raw["portals"] += [portal_entry("slow", slow_url), portal_entry("dead", "http://127.0.0.1:9")]
    client = await exporter_app(config_of(raw), ready=False)

    async def healthy_up() -> bool:
        return bool(series(await metrics_text(client), "bitrix24_up", portal="acme"))

    await wait_for(healthy_up, timeout=5)
    first = healthy.count("batch")
    await asyncio.sleep(2.0)
    # About one cycle per 300 ms while the slow portal is still in its first cycle (three
    # requests of 1.5 s); blocked behind it, the healthy one would have none.
    assert healthy.count("batch") - first >= 3
    text = await metrics_text(client)
    assert value(text, "bitrix24_up", portal="acme") == 1
    assert not series(text, "bitrix24_up", portal="slow")

    async def dead_down() -> bool:
        return bool(series(await metrics_text(client), "bitrix24_up", portal="dead"))

    await wait_for(dead_down, timeout=10)  # after its retries with backoff
    text = await metrics_text(client)
    assert value(text, "bitrix24_up", portal="dead") == 0
    assert (
        value(
            text, "bitrix24_api_requests_total", portal="dead", method="profile", code="connection"
        )
        >= 1
    )

    async def slow_done() -> bool:
        return bool(series(await metrics_text(client), "bitrix24_up", portal="slow"))

    await wait_for(slow_done, timeout=15)
    assert value(await metrics_text(client), "bitrix24_up", portal="slow") == 1


async def test_portals_dir_adds_portals(served: Any, exporter_process: Any, tmp_path: Path) -> None:
    """Portals from `portals_dir` (one small file each) are polled next to the main config's."""
    main, client_a, client_b = make_portal(1), make_portal(1), make_portal(1)
    urls = [await served(p) for p in (main, client_a, client_b)]
    directory = tmp_path / "portals.d"
    directory.mkdir()
    (directory / "client-a.yaml").write_text(yaml.safe_dump(portal_entry("client-a", urls[1])))
    (directory / "client-b.yml").write_text(yaml.safe_dump(portal_entry("client-b", urls[2])))
    raw = portal_config(urls[0], poll_interval="300ms", portals_dir=str(directory))
    process = exporter_process(raw)
    await process.wait_ready()
    async with (
        aiohttp.ClientSession() as session,
        session.get(process.url + "/metrics") as response,
    ):
        text = await response.text()
    assert {
        value(text, "bitrix24_up", portal=name) for name in ("acme", "client-a", "client-b")
    } == {1.0}
    assert client_a.count("batch") >= 1 and client_b.count("batch") >= 1
