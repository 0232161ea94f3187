"""Alert receivers wired from the config: the protection check at start and on reload,
and what a reload keeps of a receiver."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from exporter.cli import load_shard_config, main
from exporter.config import ConfigError
from exporter.fakeportal import FakePortal
from exporter.server import build_app
from exporter.webconfig import WebSecurity
from tests.alertlib import TOKEN, alert, body, receiver
from tests.support import config_of, make_portal, portal_config, register_secret, wait_for

register_secret(TOKEN)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _unprotected() -> dict[str, Any]:
    spec = receiver()
    del spec["token"]
    return spec


def _files(tmp_path: Path, *receivers: dict[str, Any]) -> tuple[Path, Path]:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(portal_config("http://127.0.0.1:1", alert_receivers=list(receivers)))
    )
    web = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"alertmanager-password", bcrypt.gensalt(4)).decode()
    web.write_text(yaml.safe_dump({"basic_auth_users": {"alertmanager": hashed}}))
    return config, web


def test_a_receiver_nothing_protects_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No token and no basic auth: exit 2 with one line naming the receiver; the same
    receiver behind basic auth, or with a token, is fine."""
    config, web = _files(tmp_path, _unprotected())
    assert main(["--config", str(config), "--check-config"]) == 2
    assert capsys.readouterr().err == (
        f"{config}: alert_receivers[0]: needs token or token_file, or basic_auth_users in the"
        " web config: otherwise anyone who reaches the exporter can post into Bitrix24\n"
    )
    assert main(["--config", str(config), "--web-config-file", str(web), "--check-config"]) == 0
    config, _ = _files(tmp_path, receiver())
    assert main(["--config", str(config), "--check-config"]) == 0


def test_a_reload_refuses_an_unprotected_receiver(tmp_path: Path) -> None:
    """What a reload loads is checked the same way, against the web config in force."""
    config, web = _files(tmp_path, _unprotected())
    with pytest.raises(ConfigError) as caught:
        load_shard_config(str(config), None, None)
    assert caught.value.problems[0].startswith(f"{config}: alert_receivers[0]: needs token")
    assert load_shard_config(str(config), None, WebSecurity(web)).alert_receivers


async def test_a_reload_keeps_what_was_delivered(
    served: Callable[[FakePortal], Awaitable[str]], aiohttp_client: Any
) -> None:
    """After a reload the same receiver remembers its deliveries (a repeat is still a
    duplicate) even with a new cap; a receiver removed by the reload answers 404."""
    portal = make_portal(3, requests_per_second=None)
    portal.add_chat(42, (1,))
    url = await served(portal)
    configs = [
        config_of(portal_config(url, alert_receivers=[receiver(max_per_minute=5)])),
        config_of(portal_config(url, alert_receivers=[])),
    ]
    loaded = iter(configs)
    first = config_of(portal_config(url, alert_receivers=[receiver()]))
    client = await aiohttp_client(build_app(first, loader=lambda: next(loaded)))

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await wait_for(ready)
    raw = body(alert(labels={"user_id": "3"}))
    assert (await client.post("/alerts/ops", json=raw, headers=AUTH)).status == 200
    assert (await client.post("/-/reload")).status == 200
    response = await client.post("/alerts/ops", json=raw, headers=AUTH)
    assert response.status == 200
    assert "already delivered to chat chat42, user 3" in await response.text()
    assert len(portal.messages) == 1
    assert (await client.post("/-/reload")).status == 200
    response = await client.post("/alerts/ops", json=raw, headers=AUTH)
    assert response.status == 404
