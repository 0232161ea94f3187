"""Hot reload: SIGHUP and POST /-/reload re-read the config of a running exporter process."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import yaml

from exporter.fakeportal import FakePortal
from tests.support import (
    make_portal,
    portal_config,
    portal_entry,
    series,
    total,
    value,
    wait_for,
)


async def counts_every_request(process: Any, portal: FakePortal, name: str) -> bool:
    """Whether portal `name`'s request counter on /metrics holds every request the portal got.

    Read between the portal's counts before and after the scrape: more than the later one is
    a bug at once; less than the earlier one is a cycle in flight (wait for the next read) or
    a counter that restarted from zero (never catches up).
    """
    recorded = portal.count()
    counted = total(await process.metrics(), "bitrix24_api_requests_total", portal=name)
    assert counted <= portal.count()
    return counted >= recorded


def two_portals(url_a: str, url_b: str) -> dict[str, Any]:
    raw = portal_config(url_a, poll_interval="300ms")
    raw["portals"].append(portal_entry("beta", url_b))
    return raw


async def test_sighup_applies_a_new_config(
    served: Any, exporter_process: Any, tmp_path: Path
) -> None:
    """SIGHUP: a removed portal's series go, a new one appears, an unchanged one keeps its state."""
    alpha, beta, gamma = make_portal(2), make_portal(2), make_portal(2)
    url_a, url_b, url_c = await served(alpha), await served(beta), await served(gamma)
    process = exporter_process(two_portals(url_a, url_b))
    await process.wait_ready()
    text = await process.metrics()
    assert value(text, "bitrix24_up", portal="beta") == 1
    profile_calls = alpha.count("profile")
    discovery_calls = alpha.count("user.get")
    stamp = value(text, "bitrix24_config_last_reload_success_timestamp_seconds")

    raw = portal_config(url_a, poll_interval="300ms")
    raw["portals"].append(portal_entry("gamma", url_c))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    process.proc.send_signal(signal.SIGHUP)

    async def switched() -> bool:
        text = await process.metrics()
        return bool(series(text, "bitrix24_up", portal="gamma")) and not series(
            text, "bitrix24_tasks", portal="beta"
        )

    await wait_for(switched)
    text = await process.metrics()
    assert not series(text, "bitrix24_up", portal="beta")
    assert value(text, "bitrix24_config_last_reload_successful") == 1
    assert value(text, "bitrix24_config_last_reload_success_timestamp_seconds") > stamp
    # alpha was not touched: no second profile or user.get call ...
    assert alpha.count("profile") == profile_calls
    assert alpha.count("user.get") == discovery_calls
    # ... and its counters keep counting from where they were, never reset to a new poller's.
    await wait_for(lambda: counts_every_request(process, alpha, "acme"))
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
    response = await process.get("/-/reload", method="POST")
    assert response.status == 500
    assert "portals[0].webhook" in response.text
    text = await process.metrics()
    assert value(text, "bitrix24_config_last_reload_successful") == 0
    before = portal.count("batch")

    async def still_polling() -> bool:
        return portal.count("batch") > before + 2

    await wait_for(still_polling)
    assert "portals[0].webhook" in process.stderr()

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(portal_config(url, poll_interval="300ms")))
    assert (await process.get("/-/reload", method="POST")).status == 200
    assert value(await process.metrics(), "bitrix24_config_last_reload_successful") == 1


async def test_changed_portal_keeps_its_bucket_and_counters(
    served: Any, exporter_process: Any, tmp_path: Path
) -> None:
    """Changing a portal's roles restarts its poller without a request burst or counter reset."""
    portal = make_portal(120, requests_per_second=2.0, burst=50)
    url = await served(portal)
    process = exporter_process(portal_config(url, poll_interval="1s"))
    await process.wait_ready()

    async def two_cycles() -> bool:
        return portal.count("batch") >= 6  # 121 commands a cycle: three batches

    await wait_for(two_cycles)
    raw = portal_config(
        url,
        poll_interval="1s",
        portal={"tasks": {"users": "all", "roles": ["view_all", "view_role_auditor"]}},
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    process.proc.send_signal(signal.SIGHUP)

    async def auditor_seen() -> bool:
        return bool(series(await process.metrics(), "bitrix24_tasks", role="view_role_auditor"))

    await wait_for(auditor_seen)
    # One counter across the reload, never reset: it holds the requests of both pollers.
    await wait_for(lambda: counts_every_request(process, portal, "acme"))
    assert portal.count(status=503) == 0
    assert portal.count("profile") == 1  # the credential's profile was carried over
