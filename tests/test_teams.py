"""Departments as pure functions: the tree, who a department covers, its sums, the
min_team_size rule, and the privacy modes applied to a snapshot, table-tested."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.bitrix import ClientStats
from exporter.config import PrivacyMode
from exporter.lines import Block, Series
from exporter.mapping import (
    DepartmentRecord,
    PayloadError,
    Sample,
    parse_departments,
    parse_user_departments,
    parse_users,
)
from exporter.metrics import (
    DEPARTMENT_IM_UNREAD,
    DEPARTMENT_INFO,
    DEPARTMENT_TASKS,
    DEPARTMENT_USERS,
    IM_CHAT_UNREAD,
    IM_UNREAD,
    TASKS,
    USER_DEPARTMENT,
    Family,
)
from exporter.privacy import Privacy, pseudonym
from exporter.snapshot import PortalSnapshot, Status
from exporter.teams import (
    DepartmentSums,
    OrgChart,
    TeamView,
    covered_users,
    department_samples,
    members_of,
    shown_departments,
    with_departments,
)

# ---- mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        # The documented shape: ids as strings, no PARENT on the root, no UF_HEAD without a head.
        (
            [
                {"ID": "1", "NAME": "Acme", "SORT": 500},
                {"ID": "15", "NAME": "R&D", "SORT": 500, "PARENT": "1", "UF_HEAD": "7"},
                {"ID": "2", "NAME": " Accounting ", "SORT": 500, "PARENT": "1"},
            ],
            [
                DepartmentRecord(1, "Acme", None, None),
                DepartmentRecord(15, "R&D", 1, 7),
                DepartmentRecord(2, "Accounting", 1, None),
            ],
        ),
        # Ints are fine too; "0", "" and junk mean "none"; a row without an ID is skipped.
        (
            [
                {"ID": 3, "NAME": "Ops", "PARENT": 1, "UF_HEAD": 0},
                {"ID": "4", "NAME": None, "PARENT": "", "UF_HEAD": "x"},
                {"NAME": "no id"},
                {"ID": "5", "PARENT": "5"},  # its own parent: a root
                "junk",
            ],
            [
                DepartmentRecord(3, "Ops", 1, None),
                DepartmentRecord(4, "", None, None),
                DepartmentRecord(5, "", None, None),
            ],
        ),
        ({}, []),  # PHP's empty array
        ([], []),
    ],
)
def test_department_get_pages_map_to_records(result: object, expected: object) -> None:
    """department.get rows become records whatever the id types; odd rows are skipped."""
    assert parse_departments(result) == expected


def test_department_get_refuses_a_shape_it_cannot_read() -> None:
    """A result that is not a list of rows is a PayloadError naming the method."""
    with pytest.raises(PayloadError, match=r"department\.get result must be a list, got str"):
        parse_departments("nope")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([1], (1,)),  # the docs: ints
        (["5", "12"], (5, 12)),  # numeric strings
        ([5, "5", 12], (5, 12)),  # duplicates once
        ([], ()),  # extranet users
        (None, ()),
        (False, ()),  # PHP's false for an unset field
        ("7", (7,)),  # a lone value
        ([0, -1, "x", 1.5, None, [2]], ()),
    ],
)
def test_uf_department_accepts_ints_and_numeric_strings(value: object, expected: object) -> None:
    """UF_DEPARTMENT becomes the user's department ids, several per user."""
    assert parse_user_departments(value) == expected


def test_user_get_records_carry_their_departments() -> None:
    """user.get rows keep UF_DEPARTMENT; a row without it is in no department."""
    records = parse_users(
        [
            {"ID": "7", "NAME": "Ann", "UF_DEPARTMENT": [1, "15"]},
            {"ID": "8", "NAME": "Bob"},
        ]
    )
    assert [(r.user_id, r.departments) for r in records] == [(7, (1, 15)), (8, ())]


# ---- the tree -----------------------------------------------------------------------------


def chart_of(*rows: tuple[int, int | None]) -> OrgChart:
    """A chart from (id, parent) pairs, named D<id>."""
    return OrgChart.of(DepartmentRecord(d, f"D{d}", p, None) for d, p in rows)


def test_the_tree_cuts_cycles_and_unknown_parents() -> None:
    """A parent that is not listed or closes a cycle leaves its department a root."""
    chart = chart_of((1, None), (2, 1), (3, 2), (4, 99), (5, 6), (6, 5))
    assert set(chart.roots) == {1, 4, 5} or set(chart.roots) == {1, 4, 6}
    assert chart.ancestry(3) == (3, 2, 1)
    assert chart.subtree(1) == {1, 2, 3}
    order = chart.bottom_up()
    assert sorted(order) == [1, 2, 3, 4, 5, 6]
    assert order.index(3) < order.index(2) < order.index(1)


def test_a_user_in_two_departments_counts_once_in_their_common_ancestors() -> None:
    """Each user counts once per department however many paths lead there."""
    chart = chart_of((1, None), (2, 1), (3, 1), (4, 3))
    covered = covered_users(chart, {10: [2, 4], 11: [4], 12: [77]}, [10, 11, 12])
    assert covered == {
        1: frozenset({10, 11}),
        2: frozenset({10}),
        3: frozenset({10, 11}),
        4: frozenset({10, 11}),
    }


def test_members_of_includes_every_sub_department() -> None:
    """tasks.users: {departments: [...]} selects the departments and all below them."""
    chart = chart_of((1, None), (2, 1), (3, 2), (4, 1))
    memberships = {10: [3], 11: [4], 12: [1], 13: [9]}
    assert members_of(chart, memberships, [2]) == [10]
    assert members_of(chart, memberships, [2, 4]) == [10, 11]
    assert members_of(chart, memberships, [1]) == [10, 11, 12]
    assert members_of(None, memberships, [1]) == [12]  # no tree known: the departments only


# ---- the min_team_size rule ---------------------------------------------------------------


def users(first: int, count: int) -> frozenset[int]:
    return frozenset(range(first, first + count))


@pytest.mark.parametrize(
    ("rows", "covered", "k", "shown"),
    [
        # A department of 4 is never shown with k=5, and its parent of 4 neither.
        ([(1, None), (2, 1)], {1: users(10, 4), 2: users(10, 4)}, 5, set()),
        # Parent 9 = child 5 + 4 others: showing both reveals a group of 4; the parent wins.
        ([(1, None), (2, 1)], {1: users(10, 9), 2: users(10, 5)}, 5, {1}),
        # Parent 10 = child 5 + 5 others: both.
        ([(1, None), (2, 1)], {1: users(10, 10), 2: users(10, 5)}, 5, {1, 2}),
        # Parent = child exactly (nobody beyond): both.
        ([(1, None), (2, 1)], {1: users(10, 5), 2: users(10, 5)}, 5, {1, 2}),
        # A hidden child still counts in its parent: 3 + 3 others = 6 beyond nothing shown.
        ([(1, None), (2, 1)], {1: users(10, 6), 2: users(10, 3)}, 5, {1}),
        # Both children would leave 2 of the parent's 12 beyond them: one child stays hidden.
        (
            [(1, None), (2, 1), (3, 1)],
            {1: users(10, 12), 2: users(10, 5), 3: users(15, 5)},
            5,
            {1, 2},
        ),
        # The larger child goes first, so the smaller one is the one hidden.
        (
            [(1, None), (2, 1), (3, 1)],
            {1: users(10, 14), 2: users(10, 5), 3: users(15, 7)},
            5,
            {1, 3},
        ),
        # The middle department would leave 3 of the root's 10; the grandchild leaves 5: the
        # rule looks at shown sub-departments at any depth.
        (
            [(1, None), (2, 1), (3, 2)],
            {1: users(10, 10), 2: users(10, 7), 3: users(10, 5)},
            5,
            {1, 3},
        ),
        # A user in both children: the union, not the sum, is what the parent covers. One
        # child alone would leave 4 of the parent's 9; both together would leave none, but
        # departments are added one at a time, so the parent stays alone.
        (
            [(1, None), (2, 1), (3, 1)],
            {1: users(10, 9), 2: users(10, 5), 3: users(14, 5)},
            5,
            {1},
        ),
        # A shown child whose own sub-department is hidden: the grandchild (3 users) still
        # counts in both, under the same rule.
        (
            [(1, None), (2, 1), (3, 2)],
            {1: users(10, 16), 2: users(10, 8), 3: users(10, 3)},
            5,
            {1, 2},
        ),
        # k = 1 (privacy none): every department that covers anyone.
        ([(1, None), (2, 1), (3, 1)], {1: users(10, 2), 2: users(10, 1)}, 1, {1, 2}),
    ],
)
def test_min_team_size_shows_what_singles_nobody_out(
    rows: list[tuple[int, int | None]], covered: dict[int, frozenset[int]], k: int, shown: set[int]
) -> None:
    """Shown: at least k users, and beyond the shown sub-departments none or at least k."""
    assert shown_departments(chart_of(*rows), covered, k) == shown


@st.composite
def companies(draw: st.DrawFn) -> tuple[OrgChart, dict[int, list[int]], int]:
    size = draw(st.integers(1, 9))
    rows = [(1, None)] + [(d, draw(st.integers(1, d - 1))) for d in range(2, size + 1)]
    people = draw(st.integers(0, 30))
    memberships = {
        u: draw(st.lists(st.integers(1, size), min_size=1, max_size=2, unique=True))
        for u in range(100, 100 + people)
    }
    return chart_of(*rows), memberships, draw(st.integers(2, 6))


def breaks_rule(
    chart: OrgChart, covered: dict[int, frozenset[int]], shown: set[int], k: int, d: int
) -> bool:
    """Whether shown department `d` breaks the rule, read as written (independently of
    the implementation): at least k users, and beyond its shown sub-departments none or at
    least k."""
    mine = covered.get(d, frozenset())
    below: set[int] = set()
    for sub in chart.subtree(d) - {d}:
        if sub in shown:
            below |= covered.get(sub, frozenset())
    beyond = len(mine - below)
    return len(mine) < k or 0 < beyond < k


@settings(max_examples=300, deadline=None)
@given(companies())
def test_min_team_size_holds_and_hides_no_more_than_needed(
    company: tuple[OrgChart, dict[int, list[int]], int],
) -> None:
    """For any tree and memberships: every shown department keeps the rule, and no hidden
    department could be shown on top without breaking the rule for itself or for a shown
    department above it."""
    chart, memberships, k = company
    covered = covered_users(chart, memberships, memberships)
    shown = shown_departments(chart, covered, k)
    for d in shown:
        assert not breaks_rule(chart, covered, shown, k, d), d
    for d in set(chart.departments) - shown:
        more = shown | {d}
        above = [a for a in chart.ancestry(d) if a == d or a in shown]
        assert any(breaks_rule(chart, covered, more, k, a) for a in above), d


# ---- department sums ----------------------------------------------------------------------

EXPIRED = "6291456"


def task(user: int, value: float, counter: str = "expired", role: str = "view_all") -> Sample:
    return Sample(TASKS, ("acme", str(user), "0", role, counter, EXPIRED), value)


def im(user: int, value: float, counter: str = "messenger") -> Sample:
    return Sample(IM_UNREAD, ("acme", str(user), counter), value)


def rows_of(samples: list[Sample], family: object) -> dict[tuple[str, ...], float]:
    return {s.labels: s.value for s in samples if s.family is family}


def test_department_sums_cover_sub_departments_and_count_each_user_once() -> None:
    """Sums per department over its subtree; a user in two departments adds once to each."""
    chart = OrgChart.of(
        [
            DepartmentRecord(1, "Acme", None, 7),
            DepartmentRecord(2, "Sales", 1, 8),
            DepartmentRecord(3, "Field", 2, None),
        ]
    )
    memberships = {7: [1], 8: [2, 3], 9: [3]}
    samples = [task(7, 1), task(8, 2), task(9, 4), im(7, 3)]
    view = TeamView("acme", frozenset({("0", "view_all")}))
    out = department_samples(view, chart, memberships, [7, 8, 9], samples)
    assert rows_of(out, DEPARTMENT_TASKS) == {
        ("acme", "1", "0", "view_all", "expired"): 7.0,
        ("acme", "2", "0", "view_all", "expired"): 6.0,
        ("acme", "3", "0", "view_all", "expired"): 6.0,
    }
    assert rows_of(out, DEPARTMENT_USERS) == {
        ("acme", "1", "tasks"): 3.0,
        ("acme", "2", "tasks"): 2.0,
        ("acme", "3", "tasks"): 2.0,
        ("acme", "1", "im"): 1.0,
    }
    assert rows_of(out, DEPARTMENT_IM_UNREAD) == {("acme", "1", "messenger"): 3.0}
    assert rows_of(out, DEPARTMENT_INFO) == {
        ("acme", "1", "Acme", "", "7"): 1.0,
        ("acme", "2", "Sales", "1", "8"): 1.0,
        ("acme", "3", "Field", "2", ""): 1.0,
    }
    assert set(rows_of(out, USER_DEPARTMENT)) == {
        ("acme", "7", "1"),
        ("acme", "8", "2"),
        ("acme", "8", "3"),
        ("acme", "9", "3"),
    }


def test_department_sums_are_made_when_first_read_and_equal_the_pure_sums() -> None:
    """with_departments hands the summing to whoever first reads a department family (the
    render thread), reads the users' lines once, and gives what department_samples gives."""
    chart = OrgChart.of([DepartmentRecord(1, "Acme", None, 7), DepartmentRecord(2, "Sales", 1, 8)])
    memberships = {7: [1], 8: [2]}
    samples = [task(7, 1), task(8, 2), im(7, 3)]
    view = TeamView("acme", frozenset({("0", "view_all")}))
    reads: list[Family] = []
    blocks = Series.of(samples).blocks

    def read(family: Family) -> bytes:
        reads.append(family)
        return blocks[family].data

    lazy = Series([Block.later(f, partial(read, f)) for f in blocks])
    out = with_departments(view, chart, memberships, [7, 8], lazy)
    assert reads == []
    expected = department_samples(view, chart, memberships, [7, 8], samples)
    assert [s for s in out if s.family not in (TASKS, IM_UNREAD)] == list(Series.of(expected))
    assert reads == [TASKS, IM_UNREAD]  # each once, by the sums (the users' own: cached)


def test_department_sums_are_made_again_only_when_what_they_sum_changed() -> None:
    """A quiet cycle (the same users' series, chart, memberships and users) gets the last
    sums as they are; a change in any of them gets new ones."""
    chart = OrgChart.of([DepartmentRecord(1, "Acme", None, 7)])
    memberships = {7: [1], 8: [1]}
    samples = Series.of([task(7, 1), task(8, 2)])
    sums = DepartmentSums(TeamView("acme", frozenset({("0", "view_all")})))
    first = sums(chart, memberships, {7, 8}, samples)
    assert sums(chart, memberships, [8, 7], samples) is first
    changed = Series.of([task(7, 5), task(8, 2)])
    assert rows_of(list(sums(chart, memberships, {7, 8}, changed)), DEPARTMENT_TASKS) == {
        ("acme", "1", "0", "view_all", "expired"): 7.0
    }
    only_7 = {7: [1]}
    again = sums(chart, only_7, {7}, changed)
    assert again is not first and sums(chart, only_7, {7}, changed) is again
    new_head = OrgChart.of([DepartmentRecord(1, "Acme", None, 8)])
    assert rows_of(list(sums(new_head, only_7, {7}, changed)), DEPARTMENT_INFO) == {
        ("acme", "1", "Acme", "", "8"): 1.0
    }


def test_a_user_whose_counters_are_not_all_exported_does_not_count() -> None:
    """A user missing one polled role's counters (refused, stale) counts nowhere."""
    chart = OrgChart.of([DepartmentRecord(1, "Acme", None, None)])
    pairs = frozenset({("0", "view_all"), ("0", "view_role_auditor")})
    samples = [
        task(7, 1),
        task(7, 1, role="view_role_auditor"),
        task(8, 5),  # view_role_auditor of user 8 is missing
    ]
    out = department_samples(TeamView("acme", pairs), chart, {7: [1], 8: [1]}, [7, 8], samples)
    assert rows_of(out, DEPARTMENT_USERS) == {("acme", "1", "tasks"): 1.0}
    assert rows_of(out, DEPARTMENT_TASKS)[("acme", "1", "0", "view_all", "expired")] == 1.0


def test_aggregate_sums_list_only_the_departments_they_show() -> None:
    """With min_size 3 a department of 2 disappears from every family, name included."""
    chart = OrgChart.of(
        [DepartmentRecord(1, "Acme", None, 7), DepartmentRecord(2, "Tiny", 1, None)]
    )
    memberships = {7: [1], 8: [1], 9: [2], 10: [2], 11: [1]}
    samples = [task(u, 1) for u in memberships]
    view = TeamView("acme", frozenset({("0", "view_all")}), min_size=3)
    out = department_samples(view, chart, memberships, list(memberships), samples)
    assert rows_of(out, DEPARTMENT_USERS) == {("acme", "1", "tasks"): 5.0}
    assert [s.labels[1] for s in out if s.family is DEPARTMENT_INFO] == ["1"]


# ---- privacy modes ------------------------------------------------------------------------

KEY = "k" * 20


def snapshot(samples: list[Sample]) -> PortalSnapshot:
    return PortalSnapshot(
        name="acme",
        up=True,
        samples=tuple(samples),
        statuses=(Status(7, "tasks", True, 1.0), Status(8, "tasks", False, None)),
        user_names=((7, "Ann Lee"),),
        stats=ClientStats(),
        operating_limit=480.0,
        duration=0.1,
        behind=0.0,
        cycles=1,
    )


MIXED = [
    task(7, 2),
    im(7, 1),
    Sample(IM_CHAT_UNREAD, ("acme", "7", "dialog", "8"), 1.0),
    Sample(IM_CHAT_UNREAD, ("acme", "7", "chat", "12"), 1.0),
    Sample(DEPARTMENT_INFO, ("acme", "1", "Acme", "", "7"), 1.0),
    Sample(DEPARTMENT_INFO, ("acme", "2", "Sales", "1", ""), 1.0),
    Sample(USER_DEPARTMENT, ("acme", "7", "1"), 1.0),
    Sample(DEPARTMENT_TASKS, ("acme", "1", "0", "view_all", "expired"), 2.0),
]


def test_the_pseudonym_is_the_documented_hmac() -> None:
    """hmac(key, "portal:user_id", sha256), first 16 hex digits: anyone with the key maps back."""
    expected = hmac.new(KEY.encode(), b"acme:7", hashlib.sha256).hexdigest()[:16]
    assert pseudonym(KEY, "acme", 7) == expected
    assert pseudonym(KEY, "beta", 7) != expected  # per portal


def test_pseudonymous_mode_replaces_every_user_id_and_drops_names() -> None:
    """user_id, head_user_id and a dialog's chat_id become pseudonyms; names go."""
    privacy = Privacy("acme", "pseudonymous", key=KEY)
    out = privacy.apply(snapshot(MIXED))
    p7, p8 = pseudonym(KEY, "acme", 7), pseudonym(KEY, "acme", 8)
    assert [s.labels for s in out.samples] == [
        ("acme", p7, "0", "view_all", "expired", EXPIRED),
        ("acme", p7, "messenger"),
        ("acme", p7, "dialog", p8),
        ("acme", p7, "chat", "12"),
        ("acme", "1", "Acme", "", p7),
        ("acme", "2", "Sales", "1", ""),
        ("acme", p7, "1"),
        ("acme", "1", "0", "view_all", "expired"),
    ]
    assert [s.user_id for s in out.statuses] == [p7, p8]
    assert out.user_names == ()
    assert privacy.who(7) == f"user {p7}"
    # The same pseudonyms from one cycle to the next.
    again = privacy.apply(snapshot(MIXED))
    assert list(again.samples) == list(out.samples)


def test_aggregate_mode_leaves_no_series_about_a_person() -> None:
    """Every family with a user_id goes, head_user_id is empty, statuses and names go."""
    privacy = Privacy("acme", "aggregate", min_team_size=5)
    out = privacy.apply(snapshot(MIXED))
    assert [(s.family.name, s.labels) for s in out.samples] == [
        ("bitrix24_department_info", ("acme", "1", "Acme", "", "")),
        ("bitrix24_department_info", ("acme", "2", "Sales", "1", "")),
        ("bitrix24_department_tasks", ("acme", "1", "0", "view_all", "expired")),
    ]
    assert out.statuses == () and out.user_names == ()
    assert privacy.who(7) is None
    assert privacy.min_team_size == 5


LABEL_TEXT = st.one_of(
    st.sampled_from(["7", "12", "", "dialog", "dialog7", "chat", 'a"b', "x\\y", "n\nl", "ü"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(LABEL_TEXT, LABEL_TEXT, LABEL_TEXT, LABEL_TEXT, LABEL_TEXT), max_size=8
    ),
    mode=st.sampled_from(["pseudonymous", "aggregate"]),
)
def test_lines_are_hidden_exactly_as_their_samples_would_be(
    rows: list[tuple[str, str, str, str, str]], mode: PrivacyMode
) -> None:
    """Whatever a label holds (quotes, backslashes, newlines, text that looks like another
    label), rewriting the exposition lines gives what hiding each sample gives."""
    samples = [
        s
        for user, section, chat, name, head in rows
        for s in (
            Sample(IM_CHAT_UNREAD, ("acme", user, section, chat), 1.0),
            Sample(DEPARTMENT_INFO, ("acme", chat, name, section, head), 1.0),
        )
    ]

    def hidden(value: str) -> str:
        return "" if mode == "aggregate" or not value else pseudonym(KEY, "acme", value)

    def dialog(s: Sample) -> str:
        other = s.labels[3]
        is_dialog = s.labels[2].startswith("dialog") and other
        return pseudonym(KEY, "acme", other) if is_dialog else other

    expected = [
        Sample(s.family, (s.labels[0], hidden(s.labels[1]), s.labels[2], dialog(s)), 1.0)
        if s.family is IM_CHAT_UNREAD
        else Sample(s.family, (*s.labels[:4], hidden(s.labels[4])), 1.0)
        for s in samples
        if not (mode == "aggregate" and s.family is IM_CHAT_UNREAD)
    ]

    def dialog(s: Sample) -> str:
        other = s.labels[3]
        return (
            pseudonym(KEY, "acme", other) if s.labels[2].startswith("dialog") and other else other
        )

    out = Privacy("acme", mode, key=KEY).apply(snapshot(samples))
    assert list(out.samples) == sorted(expected, key=lambda s: s.family is not IM_CHAT_UNREAD)


def test_an_unchanged_block_is_not_rewritten_again() -> None:
    """A family whose lines did not change since the last cycle keeps last cycle's rewrite
    (the same object, so the renderer reuses its work too); a family that goes is not read."""
    privacy = Privacy("acme", "pseudonymous", key=KEY)
    first = snapshot(MIXED)
    out = privacy.apply(first)
    again = privacy.apply(dataclasses.replace(first, cycles=2))
    assert again.samples.block(TASKS) is out.samples.block(TASKS)
    changed = privacy.apply(snapshot([task(7, 3), *MIXED[1:]]))
    assert changed.samples.block(TASKS) is not out.samples.block(TASKS)
    assert [s.value for s in changed.samples if s.family is TASKS] == [3.0]

    def unread() -> bytes:
        raise AssertionError("a family that goes was read")

    lines = Series([Block.later(TASKS, unread), *Series.of(MIXED[4:]).blocks.values()])
    dropped = Privacy("acme", "aggregate").apply(dataclasses.replace(first, samples=lines))
    assert dropped.samples.block(TASKS) is None
    assert len(list(dropped.samples)) == 3  # the department families, read as usual


def test_mode_none_changes_nothing() -> None:
    """Without a privacy mode the snapshot goes out as it is, and logs name user ids."""
    privacy = Privacy("acme")
    original = snapshot(MIXED)
    assert privacy.apply(original) is original
    assert privacy.who(7) == "user 7"
    assert privacy.min_team_size == 1
