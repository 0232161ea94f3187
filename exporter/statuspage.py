"""The landing page `/` as a status page a person can read: a pure function view -> HTML.

`render_page` turns a `PageView` (built by `exporter.statusbook` from the snapshots and
their history) into one self-contained HTML document: plain HTML and inline CSS, no
JavaScript, nothing loaded from elsewhere, laid out for a phone first. Every string that
may come from a portal or the config passes through `html.escape`; numbers are formatted
here. Elements carrying a figure have an id (`<portal>-<figure>`) so tests and scripts can
read the page back.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BudgetUse",
    "ErrorLine",
    "FailureGroup",
    "PageView",
    "PortalView",
    "ago",
    "render_page",
]


@dataclass(frozen=True)
class FailureGroup:
    """Users whose last fetch failed for one reason."""

    reason: str
    users: int
    names: tuple[str, ...]  # empty where the privacy mode hides names


@dataclass(frozen=True)
class BudgetUse:
    """Operating time one method has used in the portal's current 10-minute window."""

    method: str
    used: float
    limit: float


@dataclass(frozen=True)
class ErrorLine:
    """A recent portal-level error (redacted): when it was last seen and how often."""

    at: float
    text: str
    times: int


@dataclass(frozen=True)
class PortalView:
    """What the page shows about one portal; None where it is not known yet."""

    name: str
    state: str  # up | down | starting
    since: float | None = None
    last_cycle: float | None = None  # when the last cycle ended
    duration: float | None = None
    behind: float | None = None
    next_cycle: float | None = None
    users: int = 0
    departments: int | None = None  # with teams only
    failures: tuple[FailureGroup, ...] = ()
    requests: int = 0
    throttled: int = 0  # 503 QUERY_LIMIT_EXCEEDED
    blocked: int = 0  # 429 OPERATION_TIME_LIMIT
    counted_since: float | None = None  # start of the request window
    budget: tuple[BudgetUse, ...] = ()
    errors: tuple[ErrorLine, ...] = ()
    error: str | None = None  # the last cycle's error, if it failed


@dataclass(frozen=True)
class PageView:
    """The whole page: the exporter's own facts and one view per portal."""

    version: str
    now: float
    poll_interval: float
    reload_ok: bool
    reload_at: float | None
    portals: tuple[PortalView, ...]
    shard: tuple[int, int] | None = None


_HOUR: Final = 3600.0

_CSS: Final = """
:root{color-scheme:light dark;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--muted:#6e7781;
--line:#d0d7de;--bar:#e6e9ed}
@media (prefers-color-scheme:dark){:root{--line:#3d444d;--bar:#2d333b;--muted:#9198a1}}
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:12px;
max-width:60rem;margin-inline:auto}
h1{font-size:1.35rem;margin:.2rem 0}
h2{font-size:1.15rem;margin:0 0 .5rem;display:flex;gap:.5rem;align-items:center;
flex-wrap:wrap;overflow-wrap:anywhere}
h3{font-size:.95rem;margin:1rem 0 .3rem;color:var(--muted);text-transform:uppercase;
letter-spacing:.03em}
header p,footer{color:var(--muted);font-size:.9rem;margin:.2rem 0}
nav a{margin-right:1rem}
section{border:1px solid var(--line);border-radius:8px;padding:12px;margin:12px 0}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:0}
dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}
@media (max-width:30rem){dl{grid-template-columns:1fr}dd{margin-bottom:.4rem}}
.badge{font-size:.8rem;font-weight:600;padding:.1rem .5rem;border-radius:1rem;color:#fff}
.up{background:var(--ok)}.down{background:var(--bad)}.starting{background:var(--muted)}
.bad{color:var(--bad)}.warn{color:var(--warn)}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25rem .4rem;border-bottom:1px solid var(--line);
vertical-align:top;overflow-wrap:anywhere}
td:first-child{overflow-wrap:normal;white-space:nowrap}
.num{text-align:right;white-space:nowrap}
.budget{display:grid;grid-template-columns:minmax(8rem,max-content) 1fr;gap:.3rem .8rem;
align-items:center}
.budget .name{overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:.85rem}
.meter{background:var(--bar);border-radius:4px;height:1.2rem;position:relative;overflow:hidden}
.meter span{display:block;height:100%;background:var(--ok)}
.meter.warn span{background:var(--warn)}.meter.bad span{background:var(--bad)}
.meter small{position:absolute;left:.4rem;top:0;font-size:.8rem;line-height:1.2rem}
ul.errors{padding-left:1.1rem;margin:.2rem 0}
ul.errors li{overflow-wrap:anywhere;font-size:.9rem}
.muted{color:var(--muted)}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def ago(seconds: float) -> str:
    """A span of time in words, rounded for reading.

    >>> [ago(s) for s in (0.4, 42, 90, 3599, 3600, 90000)]
    ['0 s', '42 s', '1 min', '59 min', '1 h', '1 d 1 h']
    """
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < _HOUR:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds // _HOUR:.0f} h"
    days, rest = divmod(seconds, 86400)
    return f"{days:.0f} d {rest // _HOUR:.0f} h"


def _every(seconds: float) -> str:
    """An interval as configured: "500ms" reads "0.5 s", "90s" "90 s", "1h" "1 h"."""
    if seconds < 120 or seconds % 60:
        return f"{seconds:g} s"
    return f"{seconds / 3600:g} h" if seconds % 3600 == 0 else f"{seconds / 60:g} min"


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at)) + " UTC"


def _time(at: float, now: float) -> str:
    """A moment as a <time> element: clock time, and how long ago or ahead."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    span = f"in {ago(at - now)}" if at > now else f"{ago(now - at)} ago"
    return f'<time datetime="{stamp}">{_clock(at)}</time> <span class="muted">({span})</span>'


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def render_page(view: PageView) -> str:
    """The status page for `view`, as one HTML document."""
    # The time is that of the config in use: set at start and by every successful reload.
    loaded = "" if view.reload_at is None else " " + _time(view.reload_at, view.now)
    reload = (
        f"loaded{loaded}"
        if view.reload_ok
        else '<span class="bad">the last reload failed</span>; the config in use was'
        f" loaded{loaded}"
    )
    shard = f", shard {view.shard[0]} of {view.shard[1]}" if view.shard is not None else ""
    portals = "".join(_portal(p, view.now) for p in view.portals) or (
        '<p class="muted">No portal is configured for this replica.</p>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="30">
<title>Bitrix24 exporter</title>
<style>{_CSS}</style></head>
<body>
<header>
<h1>Bitrix24 exporter</h1>
<p>Version <span id="version">{_e(view.version)}</span>{shard}. Counters are polled in the
background every <span id="poll-interval">{_every(view.poll_interval)}</span>; scrapes and this
page serve the last poll and never wait on Bitrix24. Config: <span id="reload">{reload}</span>.
Page rendered {_clock(view.now)}.</p>
<nav><a href="metrics">Metrics</a><a href="healthz">Health</a><a href="readyz">Readiness</a></nav>
</header>
<main>
{portals}
</main>
<footer>bitrix24-exporter {_e(view.version)}: this page refreshes itself every 30 s.</footer>
</body></html>
"""


def _portal(p: PortalView, now: float) -> str:
    pid = _e(p.name)
    rows: list[tuple[str, str]] = []
    state = {"up": "Up", "down": "Down"}.get(p.state, "Starting")
    if p.since is not None:
        rows.append(("State", f"{state} since {_time(p.since, now)}"))
    else:
        rows.append(("State", "first cycle running"))
    if p.last_cycle is not None:
        cycle = _time(p.last_cycle, now)
        if p.duration is not None:
            cycle += f', took <span id="{pid}-duration">{_seconds(p.duration)}</span>'
        if p.behind is not None:
            late = "on time" if p.behind < 1 else f"{_seconds(p.behind)} late"
            cycle += f', started <span id="{pid}-behind">{late}</span>'
        rows.append(("Last cycle", cycle))
    if p.next_cycle is not None:
        due = "due now" if p.next_cycle <= now else _time(p.next_cycle, now)
        rows.append(("Next cycle", due))
    rows.append(("Users watched", f'<span id="{pid}-users">{p.users}</span>'))
    if p.departments is not None:
        rows.append(("Departments", f'<span id="{pid}-departments">{p.departments}</span>'))
    window = (
        "last hour"
        if p.counted_since is None or now - p.counted_since >= _HOUR
        else f"since {_clock(p.counted_since)}"
    )
    throttled = f'<span id="{pid}-throttled" class="{_flag(p.throttled)}">{p.throttled}</span>'
    blocked = f'<span id="{pid}-blocked" class="{_flag(p.blocked)}">{p.blocked}</span>'
    rows.append(
        (
            f"Requests, {window}",
            f'<span id="{pid}-requests">{p.requests}</span>; 503 rate limit: {throttled};'
            f" 429 operating limit: {blocked}",
        )
    )
    facts = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    error = f'<p class="bad" id="{pid}-error">{_e(p.error)}</p>' if p.error is not None else ""
    return f"""<section id="portal-{pid}">
<h2>{pid} <span class="badge {_e(p.state)}" id="{pid}-state">{_e(p.state)}</span></h2>
{error}<dl>{facts}</dl>
<h3>Fetch failures</h3>
{_failures(p)}
<h3>Operating budget, current 10 minutes</h3>
{_budget(p)}
<h3>Last errors</h3>
{_errors(p, now)}
</section>
"""


def _flag(count: int) -> str:
    return "warn" if count else "muted"


def _failures(p: PortalView) -> str:
    if not p.failures:
        none = "None: every watched user was fetched." if p.users else "No user watched yet."
        return f'<p class="muted" id="{_e(p.name)}-failures">{none}</p>'
    hidden = '<span class="muted">names hidden</span>'
    rows = []
    for group in p.failures:
        names = ", ".join(_e(n) for n in group.names[:10])
        if len(group.names) > 10:
            names += f" and {len(group.names) - 10} more"
        rows.append(
            f'<tr><td>{_e(group.reason)}</td><td class="num">{group.users}</td>'
            f"<td>{names or hidden}</td></tr>"
        )
    return (
        f'<table id="{_e(p.name)}-failures"><thead><tr><th>Reason</th><th class="num">Users</th>'
        f"<th>Who</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _budget(p: PortalView) -> str:
    if not p.budget:
        return '<p class="muted">No operating time reported yet.</p>'
    rows = []
    for use in p.budget:
        share = 0.0 if use.limit <= 0 else 100 * use.used / use.limit
        level = "bad" if share >= 90 else "warn" if share >= 50 else ""
        width = min(100.0, max(0.0, share))
        rows.append(
            f'<span class="name">{_e(use.method)}</span>'
            f'<div class="meter {level}" role="img" aria-label="{share:.0f} percent">'
            f'<span style="width:{width:.1f}%"></span>'
            f"<small>{_seconds(use.used)} of {_seconds(use.limit)} ({share:.0f} %)</small></div>"
        )
    return f'<div class="budget" id="{_e(p.name)}-budget">{"".join(rows)}</div>'


def _errors(p: PortalView, now: float) -> str:
    if not p.errors:
        return '<p class="muted">None.</p>'
    items = []
    for line in p.errors:
        times = f' <span class="muted">({line.times} times)</span>' if line.times > 1 else ""
        items.append(f"<li>{_time(line.at, now)}: {_e(line.text)}{times}</li>")
    return f'<ul class="errors" id="{_e(p.name)}-errors">{"".join(items)}</ul>'
