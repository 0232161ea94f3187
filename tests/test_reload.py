"""Hot reload: SIGHUP and POST /-/reload re-read the config of a running exporter process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import SECRET, make_portal, portal_config, series, value, wait_for


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        return await response.text()


def two_portals(url_a: str, url_b: str) -> dict[str, Any]:
    raw = portal_config(url_a, poll_interval="300ms")
    raw["portals"].append(
        {"name": "beta", "webhook": f"{url_b}/rest/1/{SECRET}/", "tasks": {"users": "all"}}
    )
    return raw


async def test_sighup_applies_a_new_config(
    served: Any, exporter_process: Any, tmp_path: Path
) -> None:
    """SIGHUP: a removed portal's series go, a new one appears, an unchanged one keeps its state."""
    alpha, beta, gamma = make_portal(2), make_portal(2), make_portal(2)
    url_a, url_b, url_c = await served(alpha), await served(beta), await served(gamma)
    process = exporter_process(two_portals(url_a, url_b))
    await process.wait_ready()
    text = await scrape(process.url)
    assert value(text, "bitrix24_up", portal="beta") == 1
    profile_calls = alpha.count("profile")
    discovery_calls = alpha.count("user.get")

    raw = portal_config(url_a, poll_interval="300ms")
    raw["portals"].append(
        {"name": "gamma", "webhook": f"{url_c}/rest/1/{SECRET}/", "tasks": {"users": "all"}}
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    process.proc.send_signal(signal.SIGHUP)

    async def switched() -> bool:
        text = await scrape(process.url)
        return bool(series(text, "bitrix24_up", portal="gamma")) and not series(
            text, "bitrix24_tasks", portal="beta"
        )

    await wait_for(switched, timeout=10)
    text = await scrape(process.url)
    assert not series(text, "bitrix24_up", portal="beta")
    assert value(text, "bitrix24_config_last_reload_successful") == 1
    assert value(text, "bitrix24_config_last_reload_success_timestamp_seconds") > 1.7e9
    # alpha was not touched: no second profile or user.get call, its counters keep counting.
    assert alpha.count("profile") == profile_calls
    assert alpha.count("user.get") == discovery_calls
    assert "Traceback" not in process.stderr()


async def test_bad_config_keeps_the_running_one(
    served: Any, exporter_process: Any, tmp_path: Path
) -> None:
    """A broken config on reload is refused: the old one keeps running and the gauge says 0."""
    portal = make_portal(2)
    url = await served(portal)
    process = exporter_process(portal_config(url, poll_interval="300ms"))
    await process.wait_ready()
    (tmp_path / "config.yaml").write_text("portals: [{name: acme, webhook: nope}]\n")
    async with aiohttp.ClientSession() as session:
        async with session.post(process.url + "/-/reload") as response:
            assert response.status == 500
            body = await response.text()
        assert "portals[0].webhook" in body
    text = await scrape(process.url)
    assert value(text, "bitrix24_config_last_reload_successful") == 0
    before = portal.count("batch")

    async def still_polling() -> bool:
        return portal.count("batch") > before + 2

    await wait_for(still_polling, timeout=5)
    assert "portals[0].webhook" in process.stderr()

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(portal_config(url, poll_interval="300ms")))
    async with (
        aiohttp.ClientSession() as session,
        session.post(process.url + "/-/reload") as response,
    ):
        assert response.status == 200
    assert value(await scrape(process.url), "bitrix24_config_last_reload_successful") == 1


async def test_changed_portal_keeps_its_bucket_and_counters(
    served: Any, exporter_process: Any, tmp_path: Path
) -> None:
    """Changing a portal's roles restarts its poller without a request burst or counter reset."""
    portal = make_portal(120, requests_per_second=2.0, burst=50)
    url = await served(portal)
    process = exporter_process(portal_config(url, poll_interval="1s"))
    await process.wait_ready()
    await asyncio.sleep(1.5)
    before = value(
        await scrape(process.url), "bitrix24_api_requests_total", method="batch", code="200"
    )
    raw = portal_config(
        url,
        poll_interval="1s",
        portal={"tasks": {"users": "all", "roles": ["view_all", "view_role_auditor"]}},
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    process.proc.send_signal(signal.SIGHUP)

    async def auditor_seen() -> bool:
        return bool(series(await scrape(process.url), "bitrix24_tasks", role="view_role_auditor"))

    await wait_for(auditor_seen, timeout=10)
    after = value(
        await scrape(process.url), "bitrix24_api_requests_total", method="batch", code="200"
    )
    assert after > before  # one counter across the reload, never reset
    assert portal.count(status=503) == 0
    assert portal.count("profile") == 1  # the credential's profile was carried over
