"""Many portals in one process: each has its own schedule, bucket and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from exporter.fakeportal import Faults
from tests.support import (
    config_of,
    make_portal,
    metrics_text,
    portal_config,
    portal_entry,
    series,
    value,
    wait_for,
)


async def test_slow_and_dead_portals_do_not_delay_others(served: Any, exporter_app: Any) -> None:
    """A portal taking minutes per answer and one refusing connections leave a healthy one
    polling cycle after cycle while the slow one is still in its first request."""
    healthy, slow = make_portal(2), make_portal(2)
    slow.faults = Faults(latency=600.0)  # ends early when the portal shuts down
    healthy_url, slow_url = await served(healthy), await served(slow)
    raw = portal_config(healthy_url, poll_interval="300ms", request_timeout="10m")
    raw["portals"] += [portal_entry("slow", slow_url), portal_entry("dead", "http://127.0.0.1:9")]
    client = await exporter_app(config_of(raw), ready=False)

    async def slow_asked() -> bool:
        return bool(slow.requests)

    await wait_for(slow_asked)
    first = healthy.count("batch")

    async def healthy_cycles() -> bool:
        return healthy.count("batch") - first >= 3

    # Three more cycles of the healthy portal (one batch each, nothing fails there) while
    # the slow one still waits for the answer to its first request: blocked behind it, the
    # healthy one would have none.
    await wait_for(healthy_cycles)
    assert [r.status for r in slow.requests] == [0]
    text = await metrics_text(client)
    assert value(text, "bitrix24_up", portal="acme") == 1
    assert not series(text, "bitrix24_up", portal="slow")

    async def dead_down() -> bool:
        return bool(series(await metrics_text(client), "bitrix24_up", portal="dead"))

    await wait_for(dead_down)  # after its retries with backoff
    text = await metrics_text(client)
    assert value(text, "bitrix24_up", portal="dead") == 0
    assert (
        value(
            text, "bitrix24_api_requests_total", portal="dead", method="profile", code="connection"
        )
        >= 1
    )
    assert not series(text, "bitrix24_up", portal="slow")
    assert [r.status for r in slow.requests] == [0]


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
    text = await process.metrics()
    assert {
        value(text, "bitrix24_up", portal=name) for name in ("acme", "client-a", "client-b")
    } == {1.0}
    assert client_a.count("batch") >= 1 and client_b.count("batch") >= 1
