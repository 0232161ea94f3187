"""Departments: the company tree, who each department covers, and its sums, once per cycle.

Bitrix24 knows the company structure (`department.get`, each user's `UF_DEPARTMENT`); a
manager reads it as "my department and everything below it". A PromQL join cannot sum
over that: a user in two departments makes the join many-to-many, and sub-departments
need the tree. So the exporter does it here, from the samples a cycle exported:

- a department *covers* the watched users who are in it or in any of its sub-departments,
  each user once however many paths lead there;
- a user counts for a source only where that source's counters of the user are exported
  (all of them: a user whose task counters for one role were refused counts nowhere);
- with a minimum group size (privacy mode ``aggregate``), a department is shown for a
  source only where that cannot single anyone out (`shown_departments`).

Everything here is pure: data in, samples out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from exporter.config import Portal
from exporter.lines import Block, Series
from exporter.mapping import DepartmentRecord, Sample
from exporter.metrics import (
    DEPARTMENT_IM_UNREAD,
    DEPARTMENT_INFO,
    DEPARTMENT_TASKS,
    DEPARTMENT_USERS,
    IM_UNREAD,
    TASKS,
    USER_DEPARTMENT,
    Family,
)

# The `source` label of bitrix24_department_users, per family summed.
TASKS_SOURCE = "tasks"
IM_SOURCE = "im"


@dataclass(frozen=True)
class OrgChart:
    """The active departments of a portal as a tree (parents before children).

    A `PARENT` that is not in the list (Bitrix24 lists only active departments) or that
    would close a cycle makes its department a root of its own.
    """

    departments: Mapping[int, DepartmentRecord]
    children: Mapping[int, tuple[int, ...]] = field(repr=False)
    roots: tuple[int, ...] = field(repr=False)

    @classmethod
    def of(cls, records: Iterable[DepartmentRecord]) -> OrgChart:
        """
        >>> chart = OrgChart.of([DepartmentRecord(1, "Acme", None, 7),
        ...                      DepartmentRecord(2, "Sales", 1, None),
        ...                      DepartmentRecord(3, "Field", 2, None)])
        >>> chart.roots, chart.ancestry(3), sorted(chart.subtree(2))
        ((1,), (3, 2, 1), [2, 3])
        """
        departments: dict[int, DepartmentRecord] = {}
        for record in records:
            departments.setdefault(record.department_id, record)
        parent_of: dict[int, int] = {}
        for department_id, record in departments.items():
            parent = record.parent
            if parent is None or parent not in departments:
                continue
            # Follow the parents up; a walk that comes back here is a cycle: cut it.
            seen = {department_id}
            step: int | None = parent
            while step is not None and step not in seen:
                seen.add(step)
                step = parent_of.get(step)
            if step is None:
                parent_of[department_id] = parent
        children: defaultdict[int, list[int]] = defaultdict(list)
        for child, parent in parent_of.items():
            children[parent].append(child)
        return cls(
            departments,
            {parent: tuple(kids) for parent, kids in children.items()},
            tuple(d for d in departments if d not in parent_of),
        )

    def parent(self, department_id: int) -> int | None:
        """The parent in the tree (None for a root), which may differ from `PARENT`."""
        record = self.departments[department_id]
        parent = record.parent
        if parent is None or department_id in self.roots:
            return None
        return parent

    def ancestry(self, department_id: int) -> tuple[int, ...]:
        """The department, its parent, the parent's parent, ... up to its root."""
        chain = [department_id]
        while (parent := self.parent(chain[-1])) is not None:
            chain.append(parent)
        return tuple(chain)

    def subtree(self, department_id: int) -> set[int]:
        """The department and all its sub-departments."""
        found = {department_id}
        stack = [department_id]
        while stack:
            for child in self.children.get(stack.pop(), ()):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        return found

    def bottom_up(self) -> list[int]:
        """Every department, each after all of its sub-departments."""
        order: list[int] = []
        stack = [(root, False) for root in reversed(self.roots)]
        while stack:
            department_id, expanded = stack.pop()
            if expanded:
                order.append(department_id)
                continue
            stack.append((department_id, True))
            stack.extend((c, False) for c in reversed(self.children.get(department_id, ())))
        return order


def covered_users(
    chart: OrgChart, memberships: Mapping[int, Sequence[int]], users: Iterable[int]
) -> dict[int, frozenset[int]]:
    """Per department, the `users` in it or in any of its sub-departments.

    Departments that cover nobody are left out; memberships of departments that are not in
    the chart (inactive, or unknown) are ignored.

    >>> chart = OrgChart.of([DepartmentRecord(1, "Acme", None, None),
    ...                      DepartmentRecord(2, "Sales", 1, None),
    ...                      DepartmentRecord(3, "Field", 2, None)])
    >>> covered = covered_users(chart, {10: [2, 3], 11: [3], 12: [99]}, [10, 11, 12])
    >>> {d: sorted(u) for d, u in sorted(covered.items())}
    {1: [10, 11], 2: [10, 11], 3: [10, 11]}
    """
    found: defaultdict[int, set[int]] = defaultdict(set)
    for user_id in users:
        for direct in memberships.get(user_id, ()):
            if direct in chart.departments:
                for department_id in chart.ancestry(direct):
                    found[department_id].add(user_id)
    return {department_id: frozenset(members) for department_id, members in found.items()}


def shown_departments(
    chart: OrgChart, covered: Mapping[int, frozenset[int]], min_size: int
) -> set[int]:
    """The departments whose sums may be shown with groups of at least `min_size` users.

    A department is shown only if it covers at least `min_size` users, and the users it
    covers beyond its shown sub-departments (at any depth) are either none or at least
    `min_size`: otherwise its sum minus theirs would reveal a smaller group. Hidden
    sub-departments still count in their shown ancestors, under the same rule.

    Where a department and a sub-department cannot both be shown, the department higher
    in the tree wins: a division's total matters to more people than one of its teams, and
    its head usually sits in it directly, so showing every team would hide the division.
    Departments are added top-down, the larger of two at the same depth first, each as
    soon as the rule holds for it and for every shown department above it, until no
    department can be added: no department stays hidden that could be shown on its own
    without breaking the rule.

    >>> chart = OrgChart.of([DepartmentRecord(1, "Acme", None, None),
    ...                      DepartmentRecord(2, "Sales", 1, None),
    ...                      DepartmentRecord(3, "Support", 1, None)])
    >>> sales, support = frozenset(range(10, 16)), frozenset(range(20, 23))
    >>> covered = {1: sales | support, 2: sales, 3: support}
    >>> sorted(shown_departments(chart, covered, 5))   # Support too small; Acme - Sales = 3
    [1]
    >>> covered = {1: sales | support | {30, 31}, 2: sales, 3: support}
    >>> sorted(shown_departments(chart, covered, 5))   # Acme - Sales = 5 users
    [1, 2]
    """
    candidates = [d for d, users in covered.items() if d in chart.departments and users]
    if min_size <= 1:
        return set(candidates)  # every rule holds with groups of one
    depth = {d: len(chart.ancestry(d)) for d in candidates}
    order = sorted(
        (d for d in candidates if len(covered[d]) >= min_size),
        key=lambda d: (depth[d], -len(covered[d]), d),
    )
    shown: set[int] = set()
    # Per shown department, the users it covers beyond its shown sub-departments.
    beyond: dict[int, frozenset[int]] = {}
    added = True
    while added:
        added = False
        for department_id in order:
            if department_id in shown:
                continue
            users = covered[department_id]
            below = chart.subtree(department_id) & shown
            mine = users.difference(*(covered[d] for d in below))
            if 0 < len(mine) < min_size:
                continue
            above = [a for a in chart.ancestry(department_id)[1:] if a in shown]
            if any(0 < len(beyond[a] - users) < min_size for a in above):
                continue
            shown.add(department_id)
            beyond[department_id] = mine
            for a in above:
                beyond[a] -= users
            added = True
    return shown


@dataclass(frozen=True, slots=True)
class TeamView:
    """How one cycle's department series are built.

    `task_pairs` are the (group_id, role) pairs a user's task counters must all be
    exported for, for the user to count. With `min_size` 1 every department that covers
    anyone is summed and every department is listed in bitrix24_department_info; above 1
    (privacy mode ``aggregate``) only the departments `shown_departments` allows, and only
    those are listed. Which labels name a person is not decided here but by
    `exporter.privacy`, for every family at once.
    """

    portal: str
    task_pairs: frozenset[tuple[str, str]]
    min_size: int = 1

    @classmethod
    def of(cls, portal: Portal, min_size: int) -> TeamView:
        """The view of a portal's configured task groups and roles."""
        tasks = portal.tasks
        pairs = frozenset((str(g), r) for g in tasks.groups for r in tasks.roles)
        return cls(portal.name, pairs, min_size)


# The families `department_samples` gives, in the order it gives them.
DEPARTMENT_FAMILIES = (
    DEPARTMENT_INFO,
    USER_DEPARTMENT,
    DEPARTMENT_USERS,
    DEPARTMENT_TASKS,
    DEPARTMENT_IM_UNREAD,
)


def with_departments(
    view: TeamView,
    chart: OrgChart,
    memberships: Mapping[int, Sequence[int]],
    watched: Iterable[int],
    samples: Series,
) -> Series:
    """`samples` and the department families summed from them; the users' lines are kept
    as they are (the department families are others).

    The sums are made when one of their families is first read, usually by the render
    thread: summing a big company's counters on the event loop held up every scrape for
    about half a second per 100,000 series. What they are made from does not change
    afterwards (`samples` and its blocks never do; the directory replaces its chart and
    memberships rather than changing them)."""
    sums = _Sums(partial(department_samples, view, chart, memberships, tuple(watched), samples))
    later = (Block.later(family, partial(sums.data, family)) for family in DEPARTMENT_FAMILIES)
    return Series([*samples.blocks.values(), *later])


class DepartmentSums:
    """`with_departments` for one portal, cycle after cycle: the last result again while
    what it is made from is the same (the users' series, the chart, the memberships and
    the watched users), so that a quiet cycle costs no summing (~1 s per 100,000 series)
    and the renderer reuses the department blocks as they are."""

    def __init__(self, view: TeamView) -> None:
        self.view = view
        self._last: tuple[OrgChart, Mapping[int, Sequence[int]], frozenset[int], Series] | None
        self._last = None
        self._result = Series()

    def __call__(
        self,
        chart: OrgChart,
        memberships: Mapping[int, Sequence[int]],
        watched: Iterable[int],
        samples: Series,
    ) -> Series:
        users = frozenset(watched)
        last = self._last
        if last is not None:
            last_chart, last_members, last_users, last_samples = last
            same = last_chart is chart and last_members is memberships
            if same and last_samples is samples and last_users == users:
                return self._result
        self._result = with_departments(self.view, chart, memberships, users, samples)
        self._last = (chart, memberships, users, samples)
        return self._result


class _Sums:
    """One cycle's department families, made once by whichever reads one of them first
    (two threads reading at once may both make them; each gets the same lines)."""

    def __init__(self, make: Callable[[], list[Sample]]) -> None:
        self._make: Callable[[], list[Sample]] | None = make
        self._series: Series | None = None

    def data(self, family: Family) -> bytes:
        series = self._series
        if series is None:
            make = self._make
            if make is None:  # made by another thread meanwhile (it sets _series first)
                return self.data(family)
            series = self._series = Series.of(make())
            self._make = None
        block = series.block(family)
        return block.data if block is not None else b""


def department_samples(
    view: TeamView,
    chart: OrgChart,
    memberships: Mapping[int, Sequence[int]],
    watched: Iterable[int],
    samples: Iterable[Sample],
) -> list[Sample]:
    """The five department families from one cycle's exported user samples.

    `memberships` maps users to the departments they are directly in, `watched` are the
    users the exporter polls (for bitrix24_user_department).
    """
    tasks: defaultdict[int, list[Sample]] = defaultdict(list)
    pairs: defaultdict[int, set[tuple[str, str]]] = defaultdict(set)
    im: defaultdict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.family is TASKS:
            user_id = int(sample.labels[1])
            tasks[user_id].append(sample)
            pairs[user_id].add((sample.labels[2], sample.labels[3]))
        elif sample.family is IM_UNREAD:
            im[int(sample.labels[1])].append(sample)
    task_users = [u for u in tasks if pairs[u] >= view.task_pairs]
    portal = view.portal
    out: list[Sample] = []
    shown_any: set[int] = set()
    sums: list[tuple[str, Family, slice, Mapping[int, list[Sample]], list[int]]] = [
        # group_id, role, counter: the counter's code is the same for everyone.
        (TASKS_SOURCE, DEPARTMENT_TASKS, slice(2, 5), tasks, task_users),
        (IM_SOURCE, DEPARTMENT_IM_UNREAD, slice(2, 3), im, list(im)),
    ]
    decided = []
    for source, family, key, per_user, users in sums:
        covered = covered_users(chart, memberships, users)
        shown = shown_departments(chart, covered, view.min_size)
        shown_any |= shown
        decided.append((source, family, key, per_user, covered, shown))
    for department_id, record in chart.departments.items():
        if view.min_size > 1 and department_id not in shown_any:
            continue  # not even its name: a hidden department's listing says it is small
        parent = chart.parent(department_id)
        info = (
            portal,
            str(department_id),
            record.name,
            "" if parent is None else str(parent),
            "" if record.head is None else str(record.head),
        )
        out.append(Sample(DEPARTMENT_INFO, info, 1.0))
    for user_id in sorted(watched):
        for department_id in memberships.get(user_id, ()):
            if department_id in chart.departments:
                out.append(Sample(USER_DEPARTMENT, (portal, str(user_id), str(department_id)), 1.0))
    for source, family, key, per_user, covered, shown in decided:
        for department_id in sorted(shown):
            members = covered[department_id]
            count = float(len(members))
            out.append(Sample(DEPARTMENT_USERS, (portal, str(department_id), source), count))
            totals: dict[tuple[str, ...], float] = {}
            for user_id in members:
                for sample in per_user[user_id]:
                    at = sample.labels[key]
                    totals[at] = totals.get(at, 0.0) + sample.value
            out.extend(
                Sample(family, (portal, str(department_id), *at), value)
                for at, value in sorted(totals.items())
            )
    return out


def members_of(
    chart: OrgChart | None, memberships: Mapping[int, Sequence[int]], departments: Sequence[int]
) -> list[int]:
    """The users in `departments` or any of their sub-departments (`tasks.users:
    {departments: [...]}`); without a chart only the departments themselves.

    >>> chart = OrgChart.of([DepartmentRecord(1, "Acme", None, None),
    ...                      DepartmentRecord(2, "Sales", 1, None)])
    >>> members_of(chart, {10: [1], 11: [2], 12: [3]}, [1]), members_of(None, {11: [2]}, [1])
    ([10, 11], [])
    """
    wanted: set[int] = set(departments)
    if chart is not None:
        for department_id in departments:
            if department_id in chart.departments:
                wanted |= chart.subtree(department_id)
    return sorted(u for u, ids in memberships.items() if wanted.intersection(ids))
