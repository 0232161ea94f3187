"""The status page `/`: rendered by a real headless Chromium from a running exporter and read
back through its DOM, the history it keeps between cycles, and escaping of everything a
portal sends."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.bitrix import ClientStats
from exporter.fakeportal import FakePortal, FakeUser
from exporter.fetchstore import FetchStore
from exporter.snapshot import PortalSnapshot, Status
from exporter.statusbook import StatusBook
from exporter.statuspage import (
    BudgetUse,
    ErrorLine,
    FailureGroup,
    PageView,
    PortalView,
    render_page,
)
from tests.support import config_of, register_secret, require_binary

NASTY = '<script>document.title="pwned"</script><b>Bold</b> & "Co"'


class _Dom(HTMLParser):
    """Every element's tag, and the text inside each element that has an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.by_id: dict[str, str] = {}
        self.title = ""
        self._open: list[tuple[str, str | None]] = []
        self._texts: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self.handle_data(" ")  # element boundaries separate words, as a reader sees them
        if tag in ("meta", "br", "link", "img", "input", "hr"):
            return
        found = dict(attrs).get("id")
        self._open.append((tag, found))
        if found:
            self._texts[found] = []

    def handle_endtag(self, tag: str) -> None:
        self.handle_data(" ")
        while self._open:
            open_tag, found = self._open.pop()
            if found:
                self.by_id[found] = " ".join("".join(self._texts.pop(found)).split())
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, found in self._open:
            if found:
                self._texts[found].append(data)
        if self._open and self._open[-1][0] == "title":
            self.title += data


def read_dom(page: str) -> _Dom:
    dom = _Dom()
    dom.feed(page)
    dom.close()
    return dom


# ---- in a real browser ----------------------------------------------------------------------


async def chromium(url: str, out: Path, *args: str) -> tuple[bytes, float]:
    """Run headless Chromium on `url`; its stdout and how long it took.

    Its profile, cache and crash files go under `out`, so nothing is left behind.
    """
    binary = require_binary("chromium")
    profile = out / "chromium-profile"
    flags = [
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-breakpad",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        binary,
        *flags,
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "HOME": str(out)},
    )
    # The exporter under test runs in this event loop: wait without blocking it.
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, f"chromium exited {process.returncode}"
    return stdout, time.monotonic() - started


async def test_status_page_in_chromium(served: Any, exporter_app: Any, tmp_path: Path) -> None:
    """A real Chromium renders `/` for an up portal with fetch failures and a down one; read
    back from its DOM: states, users watched, failures by reason with names (one of them
    full of HTML that must stay text), requests as the fake counted them, the operating
    budget per method and the down portal's error. A phone-sized screenshot is kept."""
    acme = FakePortal(operating_cost=0.5)
    for user_id in (1, 2, 3):
        acme.add_user(FakeUser(user_id, f"User{user_id}", "Test"))
    acme.users[3].name = NASTY
    acme.add_webhook(1, "acmewebhooksecret")  # user 1 is no admin: users 2 and 3 fail
    dead = FakePortal()
    dead.add_user(FakeUser(1, "Dora", "Dead", admin=True))
    dead.add_webhook(1, "deadwebhooksecret")
    dead.revoke_webhook("deadwebhooksecret")
    register_secret("acmewebhooksecret", "deadwebhooksecret")
    acme_url, dead_url = await served(acme), await served(dead)
    raw = {
        # One cycle each within the test: the figures stay as they are while it reads them.
        "poll_interval": "1h",
        "request_timeout": "5s",
        "portals": [
            {
                "name": "acme",
                "webhook": f"{acme_url}/rest/1/acmewebhooksecret/",
                "tasks": {"users": [1, 2, 3]},
            },
            {"name": "dead", "webhook": f"{dead_url}/rest/1/deadwebhooksecret/"},
        ],
    }
    client = await exporter_app(config_of(raw))
    url = str(client.make_url("/"))

    dom_text, render_seconds = await chromium(url, tmp_path, "--dump-dom")
    dom = read_dom(dom_text.decode())
    shot = tmp_path / "status-page.png"
    await chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=412,1600")

    # No script ran (the title is ours) and no element came from a portal's text.
    assert dom.title.strip() == "Bitrix24 exporter"
    assert dom.tags["script"] == 0 and dom.tags["b"] == 0
    assert dom.by_id["acme-state"] == "up"
    assert dom.by_id["dead-state"] == "down"
    assert dom.by_id["acme-users"] == "3"
    assert dom.by_id["dead-users"] == "0"
    assert dom.by_id["acme-failures"] == (
        f"Reason Users Who NoAccess 2 User2 Test, {' '.join(NASTY.split())} Test"
    )
    assert dom.by_id["acme-requests"] == str(len(acme.requests))
    assert dom.by_id["dead-requests"] == str(len(dead.requests)) == "1"
    assert (dom.by_id["acme-throttled"], dom.by_id["acme-blocked"]) == ("0", "0")
    # 0.5 s per call: one im call, three users' task counters, three user.get (names).
    assert dom.by_id["acme-budget"] == (
        "im.counters.get 0.5 s of 480 s (0 %) "
        "profile 0.5 s of 480 s (0 %) "
        "tasks.task.counters.get 1.5 s of 480 s (0 %) "
        "user.get 1.5 s of 480 s (0 %)"
    )
    error = "portal dead: profile: INVALID_CREDENTIALS: Invalid request credentials (HTTP 401)"
    assert dom.by_id["dead-error"] == error
    assert dom.by_id["dead-errors"].endswith(f" ago) : {error}")
    assert dom.by_id["version"] and dom.by_id["poll-interval"] == "1 h"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "render.txt").write_text(
        f"screenshot {shot.stat().st_size} bytes; dump-dom took {render_seconds:.2f}s\n"
    )


# ---- what the page remembers ----------------------------------------------------------------


def snapshot(
    *,
    up: bool = True,
    requests: int = 0,
    errors: dict[tuple[str, str], int] | None = None,
    error: str | None = None,
    statuses: tuple[Status, ...] = (),
    duration: float = 1.0,
    behind: float = 0.0,
) -> PortalSnapshot:
    stats = ClientStats()
    stats.requests["batch", "200"] = requests
    stats.errors.update(errors or {})
    return PortalSnapshot(
        name="acme",
        up=up,
        samples=(),
        statuses=statuses,
        user_names=((1, "Anna"), (2, "Boris")),
        stats=stats,
        operating_limit=480.0,
        duration=duration,
        behind=behind,
        cycles=1,
        error=error,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def view_of(
    book: StatusBook, snap: PortalSnapshot, privacy: dict[str, Any] | None = None
) -> PortalView:
    entry: dict[str, Any] = {"name": "acme", "webhook": "https://a.example/rest/1/s3cr3tw3bh00k/"}
    if privacy is not None:
        entry["privacy"] = privacy
    portal = config_of({"portals": [entry]}).portals[0]
    page = book.view(
        portals=[portal],
        snapshots={"acme": snap},
        poll_interval=60.0,
        version="1",
        reload_ok=True,
        reload_at=None,
    )
    return page.portals[0]


def test_up_since_changes_only_with_the_state() -> None:
    """`since` is when the portal last turned up or down, not the last cycle."""
    clock = Clock()
    book = StatusBook(clock=clock)
    book.observe(snapshot(up=True))
    clock.now += 60
    book.observe(snapshot(up=True))
    assert view_of(book, snapshot()).since == 1_000_000.0
    clock.now += 60
    down = snapshot(up=False, error="portal acme: profile: INVALID_CREDENTIALS (HTTP 401)")
    book.observe(down)
    view = view_of(book, down)
    assert (view.state, view.since, view.last_cycle) == ("down", clock.now, clock.now)


def test_requests_count_over_the_last_hour() -> None:
    """Requests, 503s and 429s count from an hour back (from the start before that), and a
    counter that starts again (a portal removed and added back) starts the count again."""
    clock = Clock()
    book = StatusBook(clock=clock)
    start = clock.now
    for minute in range(0, 121, 10):
        clock.now = start + minute * 60
        errors = {("batch", "QUERY_LIMIT_EXCEEDED"): minute, ("tasks", "OPERATION_TIME_LIMIT"): 1}
        book.observe(snapshot(requests=10 * minute, errors=errors, duration=2.0))
        view = view_of(book, snapshot())
        if minute == 30:
            # Less than an hour: everything since the first cycle began.
            assert (view.requests, view.throttled, view.counted_since) == (300, 30, start - 2.0)
    # At minute 120 the baseline is the figure from minute 60.
    assert (view.requests, view.throttled, view.blocked) == (600, 60, 0)
    assert view.counted_since == start + 60 * 60
    clock.now += 60
    book.observe(snapshot(requests=5, duration=1.0))
    view = view_of(book, snapshot())
    assert (view.requests, view.counted_since) == (5, clock.now - 1.0)


def test_last_errors_are_kept_once_each_newest_first() -> None:
    """A repeated error moves to the top with its count; at most five are kept."""
    clock = Clock()
    book = StatusBook(clock=clock)
    for text in ["a", "b", "a", "c", "d", "e", "f"]:
        clock.now += 1
        book.observe(snapshot(up=False, error=f"portal acme: x: {text}"))
    errors = view_of(book, snapshot()).errors
    assert [(e.text[-1], e.times) for e in errors] == [
        ("f", 1),
        ("e", 1),
        ("d", 1),
        ("c", 1),
        ("a", 2),
    ]


def test_failures_group_by_reason_with_names() -> None:
    """Failed users group by reason, most users first; the cycle's failure stands in where
    a status has no reason of its own."""
    clock = Clock()
    book = StatusBook(clock=clock)
    snap = snapshot(
        statuses=(
            Status(1, "tasks", False, None, "NoAccess"),
            Status(1, "im", False, None, "OPERATION_TIME_LIMIT"),
            Status(2, "tasks", False, None, "NoAccess"),
            Status(3, "tasks", False, None),
            Status(4, "tasks", True, 1.0),
        )
    )
    book.observe(snap)
    view = view_of(book, snap)
    assert view.users == 4
    assert view.failures == (
        FailureGroup("NoAccess", 2, ("Anna", "Boris")),
        FailureGroup("OPERATION_TIME_LIMIT", 1, ("Anna",)),
        FailureGroup("the cycle failed", 1, ("user 3",)),
    )


def test_no_names_outside_privacy_mode_none() -> None:
    """A pseudonymous portal's failures are counted, never named."""
    clock = Clock()
    book = StatusBook(clock=clock)
    snap = snapshot(statuses=(Status(1, "tasks", False, None, "NoAccess"),))
    book.observe(snap)
    privacy = {"mode": "pseudonymous", "pseudonym_key": "k" * 16}
    assert view_of(book, snap, privacy=privacy).failures == (FailureGroup("NoAccess", 1, ()),)
    assert view_of(book, snap).failures == (FailureGroup("NoAccess", 1, ("Anna",)),)


def test_next_cycle_follows_the_pollers_schedule() -> None:
    """The next cycle starts one interval after the last one was due, never before the last
    one started (a late cycle does not bring the next one forward)."""
    clock = Clock()
    book = StatusBook(clock=clock)
    book.observe(snapshot(duration=5.0, behind=2.0))
    assert view_of(book, snapshot(duration=5.0, behind=2.0)).next_cycle == clock.now - 7 + 60
    book.observe(snapshot(duration=5.0, behind=100.0))
    assert view_of(book, snapshot(duration=5.0, behind=100.0)).next_cycle == clock.now - 5


def test_statuses_carry_the_reason_of_a_failure() -> None:
    """A failed (user, source) carries its own failure's code, else the cycle's; a success
    none; the reasons belong to one cycle and are gone at the next."""
    store = FetchStore()
    store.failed_because((1, "tasks"), "NoAccess")
    fresh = {(1, "tasks"): False, (2, "tasks"): False, (3, "tasks"): True}
    assert store.statuses(fresh, True, None) == (
        Status(1, "tasks", False, None, "NoAccess"),
        Status(2, "tasks", False, None, None),
        Status(3, "tasks", True, None, None),
    )
    down = store.statuses(fresh, False, "INVALID_CREDENTIALS")
    assert [s.reason for s in down] == ["INVALID_CREDENTIALS"] * 3


def test_the_config_reload_state_is_shown() -> None:
    """The page says when the config in use was loaded, and when the last reload failed."""
    good = read_dom(render_page(PageView("1", 1000.0, 60.0, True, 940.0, ())))
    assert good.by_id["reload"] == "loaded 00:15:40 UTC (1 min ago)"
    bad = read_dom(render_page(PageView("1", 1000.0, 60.0, False, 940.0, ())))
    assert bad.by_id["reload"] == (
        "the last reload failed ; the config in use was loaded 00:15:40 UTC (1 min ago)"
    )


# ---- escaping -------------------------------------------------------------------------------

ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p", "span",
    "nav", "a", "main", "section", "dl", "dt", "dd", "table", "thead", "tbody", "tr", "th",
    "td", "div", "small", "ul", "li", "time", "footer",
}  # fmt: skip

text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]).filter(lambda c: c != "\x00"),
    max_size=40,
) | st.sampled_from([NASTY, "</style><script>x</script>", "'\"><img src=x onerror=alert(1)>"])


@settings(max_examples=60, deadline=None)
@given(name=text, reason=text, who=text, error=text, method=text, version=text)
def test_everything_a_portal_sends_stays_text(
    name: str, reason: str, who: str, error: str, method: str, version: str
) -> None:
    """Whatever strings a portal (or the config) supplies, the page has only its own
    elements, and each string reads back as the same text."""
    portal = PortalView(
        name=name,
        state="down",
        since=1.0,
        last_cycle=2.0,
        duration=0.5,
        behind=0.0,
        next_cycle=62.0,
        users=1,
        failures=(FailureGroup(reason, 1, (who,)),),
        budget=(BudgetUse(method, 1.0, 480.0),),
        errors=(ErrorLine(2.0, error, 2),),
        error=error,
    )
    page = render_page(PageView(version, 10.0, 60.0, False, None, (portal,)))
    dom = read_dom(page)
    assert set(dom.tags) <= ALLOWED_TAGS
    assert dom.tags["script"] == 0
    body = " ".join(dom.by_id.get(f"portal-{name}", "").split())
    for value in (name, reason, who, error, method):
        assert " ".join(value.split()) in body
    assert dom.by_id["version"] == " ".join(version.split())
