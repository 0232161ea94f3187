"""Teams: what departments cost in requests, how many series they make in each privacy mode,
and which departments `min_team_size` hides.

    .venv/bin/python bench/teams.py [--users 2000] [--departments 40] [--seed 7]

A fake company (seeded, built here): one root, divisions, teams and sub-teams four levels
deep, department sizes drawn from a long-tailed distribution so that some teams are small,
5 % of the employees in a second department and a third of the departments without a head.
The exporter (`PortalPoller`, `users: all`, role view_all, the im counters of the
credential's own user) runs cycles against it with teams off and on, in privacy modes none,
pseudonymous and aggregate (`min_team_size: 5`). Reported:

- requests per cycle with teams off and on: a cycle that refreshes the user list (every
  `user_refresh_interval`, 10 cycles at the defaults), the very first one (which also asks
  `scope`), and every other cycle; and the cost per cycle averaged over the refresh interval;
- series of the five department families in each mode;
- the departments hidden in aggregate mode, with the users their task sums would cover and
  what that leaves beyond their shown sub-departments.

Counts, not timings: the fake runs in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import NO_LIMIT, SECRET, config_of, parsed, print_machine, table

from exporter.bitrix import new_session
from exporter.fakeportal import FakeDepartment, FakePortal, FakeUser, serve
from exporter.metrics import (
    DEPARTMENT_IM_UNREAD,
    DEPARTMENT_INFO,
    DEPARTMENT_TASKS,
    DEPARTMENT_USERS,
    USER_DEPARTMENT,
)
from exporter.poller import PortalPoller
from exporter.snapshot import PortalSnapshot

FAMILIES = (
    DEPARTMENT_INFO,
    USER_DEPARTMENT,
    DEPARTMENT_TASKS,
    DEPARTMENT_IM_UNREAD,
    DEPARTMENT_USERS,
)
KEY = "bench-pseudonym-key-0123456789"
MIN_TEAM_SIZE = 5


def company(users: int, departments: int, seed: int) -> FakePortal:
    """The fake company described in the module docstring."""
    rng = random.Random(seed)
    portal = FakePortal(requests_per_second=None, operating_limit=None, seed=seed)
    tree: list[FakeDepartment] = [FakeDepartment(1, "Company", None, head=1)]
    levels = {1: 0}
    while len(tree) < departments:
        # Divisions first, then teams under a division or a team, at most four levels.
        candidates = [d for d in tree if levels[d.id] < 3]
        weights = [3.0 if levels[d.id] == 0 else 1.0 / levels[d.id] for d in candidates]
        parent = rng.choices(candidates, weights)[0]
        new_id = len(tree) + 1
        tree.append(FakeDepartment(new_id, f"Dept {new_id}", parent.id))
        levels[new_id] = levels[parent.id] + 1
    # Like most companies: a department with sub-departments holds its head and one or two
    # assistants directly, everyone else works in the teams at the leaves, whose sizes are
    # long-tailed (a few large teams, many of a handful of people).
    parents = {d.parent for d in tree if d.parent is not None}
    user_ids = list(range(1, users + 1))
    members: dict[int, list[int]] = {}
    pool = iter(user_ids)
    for department in tree:
        if department.id in parents:
            staff = [next(pool) for _ in range(rng.randint(1, 3))]
            for user_id in staff:
                members[user_id] = [department.id]
            department.head = staff[0]
    leaves = [d for d in tree if d.id not in parents]
    weights = [rng.lognormvariate(0.0, 1.1) for _ in leaves]
    for user_id in pool:
        leaf = rng.choices(leaves, weights)[0]
        members[user_id] = [leaf.id]
    for user_id in user_ids:
        if rng.random() < 0.05:
            members[user_id].append(
                rng.choice([d.id for d in tree if d.id not in members[user_id]])
            )
    for department in leaves:
        staff = [u for u, ds in members.items() if department.id in ds]
        if staff and rng.random() < 2 / 3:
            department.head = staff[0]
    for department in tree:
        portal.add_department(department)
    for user_id in user_ids:
        portal.add_user(
            FakeUser(
                user_id,
                f"User{user_id}",
                "Bench",
                admin=user_id == 1,
                departments=tuple(members[user_id]),
            )
        )
    portal.add_webhook(1, SECRET)
    return portal


def config(url: str, *, teams: bool, privacy: dict[str, Any] | None = None) -> Any:
    entry: dict[str, Any] = {
        "name": "bench",
        "webhook": f"{url}/rest/1/{SECRET}/",
        "rate_limit": NO_LIMIT,
        "tasks": {"users": "all"},
        "teams": {"enabled": teams},
    }
    if privacy:
        entry["privacy"] = privacy
    return parsed(config_of([entry]))


async def cycle_requests(
    portal: FakePortal, poller: PortalPoller
) -> tuple[int, Counter[str], PortalSnapshot]:
    """One cycle: HTTP requests, requests and batch commands by method, the snapshot."""
    before = len(portal.requests)
    snapshot = await poller.cycle()
    recorded = portal.requests[before:]
    methods: Counter[str] = Counter()
    for request in recorded:
        methods[request.method] += 1
        if request.method == "batch":
            cmd = request.params.get("cmd", {})
            for call in cmd.values() if isinstance(cmd, dict) else cmd:
                methods[f"  in batch: {str(call).partition('?')[0]}"] += 1
    return len(recorded), methods, snapshot


def force_refresh(poller: PortalPoller) -> None:
    """Make the next cycle refresh the user list (and departments), as every 10 cycles."""
    poller.directory.discovered_at = -math.inf
    poller.directory.departments_at = -math.inf


async def requests_table(portal: FakePortal, url: str, refresh_every: int) -> None:
    rows = []
    per_cycle: dict[bool, float] = {}
    async with new_session() as session:
        for teams in (False, True):
            cfg = config(url, teams=teams)
            poller = PortalPoller(cfg.portals[0], cfg, session, lambda s: None)
            first, first_methods, _ = await cycle_requests(portal, poller)
            plain, _, _ = await cycle_requests(portal, poller)
            force_refresh(poller)
            refresh, _, _ = await cycle_requests(portal, poller)
            label = "on" if teams else "off"
            rows.append((f"teams {label}", first, refresh, plain))
            per_cycle[teams] = (refresh + (refresh_every - 1) * plain) / refresh_every
            if teams:
                print("first cycle with teams, by method:")
                for method, count in sorted(first_methods.items()):
                    print(f"  {method}: {count}")
    print(
        table(
            ("", "first cycle", "user-list refresh cycle", "other cycles"),
            rows,
        )
    )
    extra = per_cycle[True] - per_cycle[False]
    print(
        f"teams cost per cycle, averaged over a refresh interval of {refresh_every} cycles:"
        f" {per_cycle[False]:.1f} -> {per_cycle[True]:.1f} requests ({extra:+.2f})"
    )


async def series_table(url: str) -> dict[str, PortalSnapshot]:
    modes: dict[str, dict[str, Any] | None] = {
        "none": None,
        "pseudonymous": {"mode": "pseudonymous", "pseudonym_key": KEY},
        "aggregate": {"mode": "aggregate", "min_team_size": MIN_TEAM_SIZE},
    }
    snapshots: dict[str, PortalSnapshot] = {}
    async with new_session() as session:
        for mode, privacy in modes.items():
            cfg = config(url, teams=True, privacy=privacy)
            poller = PortalPoller(cfg.portals[0], cfg, session, lambda s: None)
            snapshots[mode] = await poller.cycle()
    rows = []
    for mode, snapshot in snapshots.items():
        counts = Counter(s.family for s in snapshot.samples)
        user_series = sum(n for f, n in counts.items() if "user_id" in f.labels)
        rows.append(
            (mode, *(counts[f] for f in FAMILIES), sum(counts[f] for f in FAMILIES), user_series)
        )
    print(
        table(
            (
                "mode",
                *(f.name.removeprefix("bitrix24_") for f in FAMILIES),
                "department series",
                "series with a user",
            ),
            rows,
        )
    )
    return snapshots


def suppressed(snapshots: dict[str, PortalSnapshot], portal: FakePortal) -> None:
    """The departments aggregate mode hides, and why, worked out from the outside: the
    company's ground truth and the departments the aggregate snapshot shows."""
    shown = {
        int(s.labels[1])
        for s in snapshots["aggregate"].samples
        if s.family is DEPARTMENT_USERS and s.labels[2] == "tasks"
    }
    parent = {d.id: d.parent for d in portal.departments.values()}

    def chain(department_id: int) -> list[int]:
        found = [department_id]
        while (up := parent.get(found[-1])) is not None:
            found.append(up)
        return found

    members: dict[int, set[int]] = {d: set() for d in parent}
    for user in portal.users.values():
        for direct in user.departments:
            for department_id in chain(direct):
                members[department_id].add(user.id)

    def beyond(department_id: int, visible: set[int]) -> set[int]:
        below = [d for d in visible if d != department_id and department_id in chain(d)]
        return members[department_id].difference(*(members[d] for d in below))

    rows = []
    k = MIN_TEAM_SIZE
    for department_id in sorted(set(parent) - shown):
        covers = len(members[department_id])
        mine = len(beyond(department_id, shown))
        if covers < k:
            why = f"covers {covers} < {k}"
        elif 0 < mine < k:
            why = f"{mine} of its users beyond its shown sub-departments"
        else:
            with_it = shown | {department_id}
            above = next(
                a
                for a in chain(department_id)[1:]
                if a in shown and 0 < len(beyond(a, with_it)) < k
            )
            left = len(beyond(above, with_it))
            why = f"would leave {left} of {portal.departments[above].name}'s users beyond it"
        rows.append((department_id, portal.departments[department_id].name, covers, why))
    print(f"departments hidden in aggregate mode (min_team_size {k}): {len(rows)} of {len(parent)}")
    print(table(("id", "name", "users covered", "why hidden"), rows))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--departments", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print_machine()
    portal = company(args.users, args.departments, args.seed)
    sizes = Counter(d for u in portal.users.values() for d in u.departments)
    two = sum(1 for u in portal.users.values() if len(u.departments) > 1)
    headless = sum(1 for d in portal.departments.values() if d.head is None)
    print(
        f"company: {len(portal.users)} employees in {len(portal.departments)} departments"
        f" (direct sizes {min(sizes.values(), default=0)}-{max(sizes.values(), default=0)},"
        f" {sum(1 for n in sizes.values() if n < MIN_TEAM_SIZE)} with fewer than"
        f" {MIN_TEAM_SIZE} direct members), {two} in two departments, {headless} without a head"
    )
    runner, url = await serve(portal)
    try:
        await requests_table(portal, url, refresh_every=10)
        snapshots = await series_table(url)
        suppressed(snapshots, portal)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
