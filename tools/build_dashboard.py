"""Build grafana/dashboards/bitrix24.json, the Bitrix24 dashboard.

The JSON file is what users import and what Grafana provisions; this script is where it is
edited. Panel ids and grid positions are computed here, so adding a panel is one line and
never leaves overlapping or duplicate ids. tests/test_operator_kit.py fails when the JSON
and this script disagree.

    python tools/build_dashboard.py            # rewrite the JSON
    python tools/build_dashboard.py --check    # exit 1 if the JSON is out of date

Why plain dicts and not Grafana's typed Python builders (grafana-foundation-sdk, measured on
this dashboard): a port was 7 % shorter (817 lines instead of 878; most lines are titles,
descriptions and PromQL either way) and type-checks panel options that the schema check in
the tests cannot see, but its types follow Grafana 10.1: it writes schemaVersion 36 and
variable ids that Grafana's current published Dashboard type (the one the tests check
against) rejects, and fixing that up takes untyped post-processing again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "grafana" / "dashboards" / "bitrix24.json"

UID = "bitrix24-exporter"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label filters shared by the queries. Roles and groups overlap (view_all covers every role,
# group 0 covers every group), so both are single-value variables: a sum over users never
# counts one task counter twice through two roles or two groups.
P = 'portal=~"$portal"'
PU = f'{P}, user_id=~"$user"'
TASK = f'{PU}, role="$role", group_id="$group"'
PD = f'{P}, department_id=~"$department"'
DEPT_TASK = f'{PD}, role="$role", group_id="$group"'

Json = dict[str, Any]


def with_names(expr: str) -> str:
    """Add the user's name (bitrix24_user_info) to each series of a per-user expression.

    Series of users without a bitrix24_user_info series are kept, without a name, by the
    `or on(portal, user_id)` fallback instead of silently dropping out of the join.
    """
    return (
        f"({expr}) * on (portal, user_id) group_left (name) bitrix24_user_info"
        f" or on (portal, user_id) ({expr})"
    )


def per_department(counter: str) -> str:
    return (
        "sum by (portal, department_id)"
        f' (bitrix24_department_tasks{{{DEPT_TASK}, counter="{counter}"}})'
    )


def per_person(counter: str) -> str:
    """A department's counter over the users its task sums cover."""
    return (
        f"{per_department(counter)} / on (portal, department_id)"
        f' sum by (portal, department_id) (bitrix24_department_users{{{PD}, source="tasks"}})'
    )


def with_department_names(expr: str) -> str:
    """Add the department's name (bitrix24_department_info) to each per-department series."""
    return (
        f"({expr}) * on (portal, department_id) group_left (name)"
        f" max by (portal, department_id, name) (bitrix24_department_info{{{P}}})"
    )


def with_heads(expr: str) -> str:
    """Add the department's name and head from the recording rule in prometheus/rules.yml
    (the head's name where the exporter exports names, else its id); without the rules the
    series stay, unnamed, through the `or on(...)` fallback."""
    heads = (
        "max by (portal, department_id, department, head)"
        f" (job_portal_department_id:bitrix24_department_info:head{{{P}}})"
    )
    return (
        f"({expr}) * on (portal, department_id) group_left (department, head) {heads}"
        f" or on (portal, department_id) ({expr})"
    )


def per_user(counter: str, *, labels: str = TASK, metric: str = "bitrix24_tasks") -> str:
    return f'sum by (portal, user_id) ({metric}{{{labels}, counter="{counter}"}})'


def target(expr: str, legend: str = "__auto", ref: str = "A", *, table: bool = False) -> Json:
    t: Json = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend}
    if table:
        t.update(format="table", instant=True, range=False)
    else:
        t.update(range=True, instant=False)
    return t


def thresholds(steps: tuple[tuple[str, float], ...], base: str = "green") -> Json:
    return {
        "mode": "absolute",
        "steps": [{"color": base, "value": None}] + [{"color": c, "value": v} for c, v in steps],
    }


def stat(
    title: str,
    description: str,
    expr: str,
    *,
    unit: str = "short",
    steps: tuple[tuple[str, float], ...] = (),
    base: str = "green",
    mappings: list[Json] | None = None,
    legend: str = "__auto",
    text_mode: str = "auto",
    color_mode: str = "background",
    graph_mode: str = "area",
) -> Json:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": thresholds(steps, base),
                "unit": unit,
                "mappings": mappings or [],
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": color_mode,
            "graphMode": graph_mode,
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": text_mode,
            "wideLayout": True,
            "showPercentChange": False,
        },
        "targets": [target(expr, legend)],
    }


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    *,
    unit: str = "short",
    bars: bool = False,
    overrides: list[Json] | None = None,
    legend_calcs: tuple[str, ...] = ("lastNotNull", "max"),
) -> Json:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "palette-classic"},
                "unit": unit,
                "min": 0,
                "custom": {
                    "drawStyle": "bars" if bars else "line",
                    "lineWidth": 1,
                    "fillOpacity": 60 if bars else 10,
                    "showPoints": "never",
                    "spanNulls": False,
                    # Counters of different kinds, roles or groups overlap: stacking would
                    # draw sums that mean nothing.
                    "stacking": {"mode": "none", "group": "A"},
                },
            },
            "overrides": overrides or [],
        },
        "options": {
            "legend": {
                "showLegend": True,
                "displayMode": "table",
                "placement": "right",
                "calcs": list(legend_calcs),
                "sortBy": "Last *" if "lastNotNull" in legend_calcs else "Name",
                "sortDesc": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def table(
    title: str,
    description: str,
    targets: list[Json],
    transformations: list[Json],
    *,
    sort_by: str | None = None,
    steps: tuple[tuple[str, float], ...] = (),
) -> Json:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": thresholds(steps),
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "filterable": True},
            },
            "overrides": [],
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "sortBy": [{"displayName": sort_by, "desc": True}] if sort_by else [],
            "footer": {"show": False, "reducer": ["sum"], "countRows": False, "fields": ""},
        },
        "targets": targets,
        "transformations": transformations,
    }


def organize(rename: dict[str, str], order: list[str], hide: tuple[str, ...] = ("Time",)) -> Json:
    return {
        "id": "organize",
        "options": {
            "excludeByName": {name: True for name in hide},
            "indexByName": {name: i for i, name in enumerate(order)},
            "renameByName": rename,
        },
    }


def matrix(column: str) -> Json:
    """One row per user, one column per value of the `column` label."""
    return {
        "id": "groupingToMatrix",
        "options": {
            "columnField": column,
            "rowField": "name",
            "valueField": "Value",
            "emptyValue": "null",
        },
    }


def top_users_table(title: str, description: str, counter: str, column: str) -> Json:
    expr = f"topk(20, {per_user(counter)} > 0)"
    return table(
        title,
        description,
        [target(with_names(expr), table=True)],
        [
            organize(
                {"name": "User", "portal": "Portal", "user_id": "User ID", "Value": column},
                ["name", "portal", "user_id", "Value"],
            )
        ],
        sort_by=column,
        steps=(("orange", 1), ("red", 10)),
    )


def top_departments_table(title: str, description: str, counter: str, column: str) -> Json:
    expr = f"topk(20, {per_department(counter)} > 0)"
    return table(
        title,
        description,
        [target(with_heads(expr), table=True)],
        [
            organize(
                {
                    "department": "Department",
                    "head": "Head",
                    "portal": "Portal",
                    "department_id": "Department ID",
                    "Value": column,
                },
                ["department", "head", "portal", "department_id", "Value"],
            )
        ],
        sort_by=column,
        steps=(("orange", 1), ("red", 20)),
    )


def named_lines(title: str, description: str, expr: str) -> Json:
    return timeseries(title, description, [target(with_names(expr), "{{name}} ({{user_id}})")])


UP_MAPPING = [
    {
        "type": "value",
        "options": {
            "0": {"text": "DOWN", "color": "red", "index": 0},
            "1": {"text": "UP", "color": "green", "index": 1},
        },
    }
]

OVERVIEW = [
    stat(
        "Overdue tasks",
        "Sum of every selected user's overdue-task counter (counter=expired) for the selected"
        " role and group. A task overdue for two watched users counts twice.",
        f"sum({per_user('expired')})",
        steps=(("orange", 1), ("red", 20)),
    ),
    stat(
        "Unread task comments",
        "Sum of every selected user's unread task comments (counter=new_comments) for the"
        " selected role and group.",
        f"sum({per_user('new_comments')})",
        steps=(("orange", 20), ("red", 100)),
    ),
    stat(
        "Unread chat messages",
        "Sum over users of im.counters.get MESSENGER (dialogs, group chats, open lines). Other"
        " kinds overlap with it and are not added.",
        f'sum(bitrix24_im_unread{{{PU}, counter="messenger"}})',
        steps=(("orange", 50), ("red", 200)),
    ),
    stat(
        "Unread notifications",
        "Sum over users of im.counters.get NOTIFY.",
        f'sum(bitrix24_im_unread{{{PU}, counter="notify"}})',
        steps=(("orange", 50), ("red", 200)),
    ),
    stat(
        "Portal reachable",
        "DOWN when the last poll cycle of any selected portal failed to reach or authenticate"
        " to Bitrix24 (bitrix24_up). The numbers on this dashboard are then the last good ones.",
        f"min(bitrix24_up{{{P}}})",
        unit="none",
        base="red",
        steps=(("green", 1),),
        mappings=UP_MAPPING,
    ),
    stat(
        "Data age",
        "Age of the oldest counter on this dashboard: now minus the oldest"
        " bitrix24_last_success_timestamp_seconds (in privacy mode aggregate, of"
        " bitrix24_collect_oldest_success_timestamp_seconds). It grows when the exporter cannot"
        " poll.",
        f"time() - min(bitrix24_last_success_timestamp_seconds{{{PU}}}"
        f" or bitrix24_collect_oldest_success_timestamp_seconds{{{P}}})",
        unit="s",
        steps=(("orange", 300), ("red", 900)),
    ),
    top_users_table(
        "Users with the most overdue tasks",
        "Top 20 users by overdue tasks (counter=expired) for the selected role and group.",
        "expired",
        "Overdue",
    ),
    top_users_table(
        "Users with the most unread task comments",
        "Top 20 users by unread task comments (counter=new_comments) for the selected role and"
        " group.",
        "new_comments",
        "Unread comments",
    ),
]

TEAMS = [
    top_departments_table(
        "Departments with the most overdue tasks",
        "Top 20 departments by overdue tasks (counter=expired) for the selected role and group,"
        " each counting its sub-departments, with the head (a name where the exporter exports"
        " names, else the head's user id or pseudonym). Needs teams.enabled: true; in privacy"
        " mode aggregate only departments large enough to be shown.",
        "expired",
        "Overdue",
    ),
    top_departments_table(
        "Departments with the most unread task comments",
        "Top 20 departments by unread task comments (counter=new_comments) for the selected"
        " role and group, each counting its sub-departments, with the head.",
        "new_comments",
        "Unread comments",
    ),
    timeseries(
        "Overdue tasks per department",
        "Overdue tasks (counter=expired) of each selected department and its sub-departments,"
        " for the selected role and group. A department contains its sub-departments: compare"
        " the lines, never add them.",
        [target(with_department_names(per_department("expired")), "{{name}}")],
    ),
    timeseries(
        "Overdue tasks per person",
        "Overdue tasks of each selected department divided by the users its sums cover"
        " (bitrix24_department_users, source tasks): a department's average, comparable"
        " between departments of any size. The alert Bitrix24DepartmentTasksOverdue fires"
        " above 3 for a day.",
        [target(with_department_names(per_person("expired")), "{{name}}")],
        unit="none",
    ),
]

TASKS = [
    named_lines(
        "Overdue tasks per user",
        "Overdue tasks (counter=expired) of each selected user, for the selected role and group.",
        per_user("expired"),
    ),
    named_lines(
        "Unread task comments per user",
        "Unread task comments (counter=new_comments) of each selected user, for the selected"
        " role and group.",
        per_user("new_comments"),
    ),
    timeseries(
        "Overdue tasks by role",
        "Overdue tasks summed over the selected users, one line per role. Roles overlap"
        " (view_all covers the others): compare the lines, never add them.",
        [
            target(
                f'sum by (role) (bitrix24_tasks{{{PU}, group_id="$group", counter="expired"}})',
                "{{role}}",
            )
        ],
    ),
    timeseries(
        "Unread task comments by role",
        "Unread task comments summed over the selected users, one line per role. Roles overlap"
        " (view_all covers the others): compare the lines, never add them.",
        [
            target(
                f'sum by (role) (bitrix24_tasks{{{PU}, group_id="$group",'
                ' counter="new_comments"})',
                "{{role}}",
            )
        ],
    ),
    timeseries(
        "Every task counter",
        "Every counter the portal returns for the selected role and group (names differ"
        " between Bitrix24 versions: expired, new_comments, mentioned; older portals also"
        " wo_deadline, expired_soon, not_viewed, wait_ctrl), summed over the selected users.",
        [target(f"sum by (counter) (bitrix24_tasks{{{TASK}}})", "{{counter}}")],
    ),
    table(
        "Task counters per user",
        "One row per user, one column per counter the portal returns, for the selected role"
        " and group.",
        [
            target(
                with_names(f"sum by (portal, user_id, counter) (bitrix24_tasks{{{TASK}}})"),
                table=True,
            )
        ],
        [matrix("counter")],
    ),
]

CHATS = [
    timeseries(
        "Unread by kind",
        "im.counters.get TYPE values summed over the selected users, one line per kind. The"
        " kinds overlap (all = messenger + notify; messenger includes chat, dialog and lines):"
        " compare the lines, never add them.",
        [target(f"sum by (counter) (bitrix24_im_unread{{{PU}}})", "{{counter}}")],
    ),
    table(
        "Unread chat counters per user",
        "One row per user, one column per im.counters.get kind. The kinds overlap.",
        [
            target(
                with_names(f"sum by (portal, user_id, counter) (bitrix24_im_unread{{{PU}}})"),
                table=True,
            )
        ],
        [matrix("counter")],
    ),
    named_lines(
        "Unread chat messages per user",
        "im.counters.get MESSENGER of each selected user (dialogs, group chats, open lines).",
        per_user("messenger", labels=PU, metric="bitrix24_im_unread"),
    ),
    named_lines(
        "Unread notifications per user",
        "im.counters.get NOTIFY of each selected user.",
        per_user("notify", labels=PU, metric="bitrix24_im_unread"),
    ),
    table(
        "Chats with the most unread messages",
        "Top 20 chats by unread messages (bitrix24_im_chat_unread). Empty unless the portal"
        " has im.chats: true in the exporter config. For dialogs chat_id is the other"
        " person's user id.",
        [target(with_names(f"topk(20, bitrix24_im_chat_unread{{{PU}}} > 0)"), table=True)],
        [
            organize(
                {
                    "name": "User",
                    "portal": "Portal",
                    "user_id": "User ID",
                    "section": "Section",
                    "chat_id": "Chat ID",
                    "Value": "Unread",
                },
                ["name", "portal", "user_id", "section", "chat_id", "Value"],
                hide=("Time", "__name__", "instance", "job"),
            )
        ],
        sort_by="Unread",
    ),
]

LIMIT_OVERRIDE = {
    "matcher": {"id": "byRegexp", "options": ".*(limit|interval|threshold).*"},
    "properties": [
        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
        {"id": "custom.fillOpacity", "value": 0},
    ],
}

HEALTH = [
    {
        "type": "state-timeline",
        "title": "Portal reachable over time",
        "description": "bitrix24_up per portal: whether the last poll cycle reached the portal"
        " and authenticated.",
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": thresholds((("green", 1),), "red"),
                "mappings": UP_MAPPING,
                "custom": {"fillOpacity": 80, "lineWidth": 0},
            },
            "overrides": [],
        },
        "options": {
            "showValue": "never",
            "mergeValues": True,
            "rowHeight": 0.9,
            "alignValue": "left",
            "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "single", "sort": "none"},
        },
        "targets": [target(f"bitrix24_up{{{P}}}", "{{portal}}")],
    },
    timeseries(
        "Data age per source",
        "Now minus the oldest successful fetch per portal and source (im, tasks), from the"
        " per-user timestamps or, in privacy mode aggregate, the per-portal oldest. The dashed"
        " line is the Bitrix24DataStale threshold: two poll intervals.",
        [
            target(
                "time() - min by (portal, source)"
                f" (bitrix24_last_success_timestamp_seconds{{{P}}}"
                f" or bitrix24_collect_oldest_success_timestamp_seconds{{{P}}})",
                "{{portal}} {{source}}",
            ),
            target(
                "2 * max(bitrix24_poll_interval_seconds)",
                "stale threshold (2 x poll interval)",
                "B",
            ),
        ],
        unit="s",
        overrides=[LIMIT_OVERRIDE],
    ),
    timeseries(
        "Poll cycle duration",
        "How long the last poll cycle of each portal took, and how late it started, against"
        " the configured poll interval. A duration near the interval means the rate limit or"
        " the operating budget cannot keep up with the number of users.",
        [
            target(f"bitrix24_poll_duration_seconds{{{P}}}", "{{portal}} duration"),
            target(f"bitrix24_poll_behind_seconds{{{P}}}", "{{portal}} behind schedule", "B"),
            target("max(bitrix24_poll_interval_seconds)", "poll interval", "C"),
        ],
        unit="s",
        overrides=[LIMIT_OVERRIDE],
    ),
    timeseries(
        "API requests by code",
        "HTTP requests per second to Bitrix24 by portal and outcome (HTTP status, timeout,"
        " connection).",
        [
            target(
                "sum by (portal, code)"
                f" (rate(bitrix24_api_requests_total{{{P}}}[$__rate_interval]))",
                "{{portal}} {{code}}",
            )
        ],
        unit="reqps",
    ),
    timeseries(
        "Bitrix24 errors by code",
        "Bitrix24 error codes received per interval, including errors of single commands"
        " inside batch responses. QUERY_LIMIT_EXCEEDED = rate limited, OPERATION_TIME_LIMIT ="
        " method budget used up, auth codes (INVALID_CREDENTIALS, NO_AUTH_FOUND, ...) = bad"
        " webhook or token.",
        [
            target(
                "sum by (portal, error)"
                f" (increase(bitrix24_api_errors_total{{{P}}}[$__rate_interval]))",
                "{{portal}} {{error}}",
            )
        ],
        bars=True,
        legend_calcs=("sum",),
    ),
    timeseries(
        "Rate-limit waits",
        "Seconds per second spent waiting for the client-side leaky bucket or a"
        " QUERY_LIMIT_EXCEEDED backoff. Steady waiting is normal on a busy portal; waiting"
        " close to 1 s/s means polls are throttled all the time.",
        [
            target(
                "sum by (portal)"
                f" (rate(bitrix24_rate_limit_wait_seconds_total{{{P}}}[$__rate_interval]))",
                "{{portal}}",
            )
        ],
        unit="s",
    ),
    timeseries(
        "Operating budget used",
        "Method execution time Bitrix24 counted in its current 10-minute window, per method,"
        " against the configured per-method limit (dashed). Past the limit Bitrix24 blocks"
        " the method with OPERATION_TIME_LIMIT.",
        [
            target(
                f"max by (portal, method) (bitrix24_api_operating_seconds{{{P}}})",
                "{{portal}} {{method}}",
            ),
            target(
                f"max by (portal) (bitrix24_api_operating_limit_seconds{{{P}}})",
                "{{portal}} limit",
                "B",
            ),
        ],
        unit="s",
        overrides=[LIMIT_OVERRIDE],
    ),
    timeseries(
        "API request latency",
        "Median and 95th percentile duration of HTTP requests to Bitrix24.",
        [
            target(
                "histogram_quantile(0.5, sum by (portal, le)"
                f" (rate(bitrix24_api_request_duration_seconds_bucket{{{P}}}[$__rate_interval])))",
                "{{portal}} p50",
            ),
            target(
                "histogram_quantile(0.95, sum by (portal, le)"
                f" (rate(bitrix24_api_request_duration_seconds_bucket{{{P}}}[$__rate_interval])))",
                "{{portal}} p95",
                "B",
            ),
        ],
        unit="s",
    ),
    stat(
        "Exporter version",
        "bitrix24_exporter_build_info of each exporter process.",
        "count by (version, python_version) (bitrix24_exporter_build_info)",
        legend="{{version}} (Python {{python_version}})",
        text_mode="name",
        color_mode="none",
        graph_mode="none",
    ),
    stat(
        "Config reload",
        "Whether the last configuration (re)load succeeded"
        " (bitrix24_config_last_reload_successful).",
        "min(bitrix24_config_last_reload_successful)",
        unit="none",
        base="red",
        steps=(("green", 1),),
        mappings=[
            {
                "type": "value",
                "options": {
                    "0": {"text": "FAILED", "color": "red", "index": 0},
                    "1": {"text": "OK", "color": "green", "index": 1},
                },
            }
        ],
        graph_mode="none",
    ),
]

# (row title, panels, (width, height) of each panel in order)
LAYOUT: list[tuple[str, list[Json], list[tuple[int, int]]]] = [
    ("Overview", OVERVIEW, [(4, 5)] * 6 + [(12, 9)] * 2),
    ("Teams", TEAMS, [(12, 9)] * 4),
    ("Tasks", TASKS, [(12, 9)] * 6),
    ("Chats", CHATS, [(12, 9)] * 5),
    ("Exporter health", HEALTH, [(12, 6)] + [(12, 8)] * 7 + [(6, 4)] * 2),
]


def variables() -> list[Json]:
    def query_var(name: str, label: str, query: str, **extra: Any) -> Json:
        v: Json = {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "query": query,
            "refresh": 2,  # on time range change: users and roles come and go
            "hide": 0,
            "regex": "",
            "sort": 1,
            "multi": False,
            "includeAll": False,
            "options": [],
        }
        v.update(extra)
        return v

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "refresh": 1,
            "hide": 0,
            "regex": "",
            "multi": False,
            "includeAll": False,
            "options": [],
        },
        query_var(
            "portal",
            "Portal",
            "label_values(bitrix24_up, portal)",
            multi=True,
            includeAll=True,
            allValue=".*",
        ),
        # The value is the department id, the text its name (labels in sorted order).
        query_var(
            "department",
            "Department",
            "query_result(max by (portal, department_id, name)"
            ' (bitrix24_department_info{portal=~"$portal"}))',
            regex='/department_id="(?<value>[^"]*)",name="(?<text>[^"]*)"/',
            sort=5,
            multi=True,
            includeAll=True,
            allValue=".*",
            description="A department counts its sub-departments (teams.enabled: true).",
        ),
        # The value is the user id, the text the name: query_result prints
        # {name="...",portal="...",user_id="..."} (labels in sorted order) and the regex
        # picks both with named groups.
        query_var(
            "user",
            "User",
            'query_result(max by (portal, user_id, name) (bitrix24_user_info{portal=~"$portal"}))',
            regex='/name="(?<text>[^"]*)".*user_id="(?<value>[^"]*)"/',
            sort=5,
            multi=True,
            includeAll=True,
            allValue=".*",
        ),
        # Roles and groups of users or, where no series carries a user (privacy mode
        # aggregate), of departments.
        query_var(
            "role",
            "Role",
            'query_result(max by (role) (bitrix24_tasks{portal=~"$portal"})'
            ' or max by (role) (bitrix24_department_tasks{portal=~"$portal"}))',
            regex='/role="([^"]*)"/',
            current={"text": "view_all", "value": "view_all", "selected": True},
            description="Task counter role. view_all covers every role, so one role is shown"
            " at a time.",
        ),
        query_var(
            "group",
            "Group (0 = all)",
            'query_result(max by (group_id) (bitrix24_tasks{portal=~"$portal"})'
            ' or max by (group_id) (bitrix24_department_tasks{portal=~"$portal"}))',
            regex='/group_id="([^"]*)"/',
            current={"text": "0", "value": "0", "selected": True},
            sort=3,
            description="Bitrix24 workgroup id; 0 counts tasks of every group.",
        ),
    ]


def build() -> Json:
    panels: list[Json] = []
    next_id = 1
    y = 0
    for title, row_panels, sizes in LAYOUT:
        assert len(row_panels) == len(sizes), title
        panels.append(
            {
                "type": "row",
                "title": title,
                "id": next_id,
                "collapsed": False,
                "panels": [],
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel, (w, h) in zip(row_panels, sizes, strict=True):
            if x + w > 24:
                y += line_height
                x = 0
                line_height = 0
            panel = {"id": next_id, "gridPos": {"x": x, "y": y, "w": w, "h": h}} | panel
            panels.append(panel)
            next_id += 1
            x += w
            line_height = max(line_height, h)
        y += line_height
    return {
        "uid": UID,
        "title": "Bitrix24",
        "description": "Bitrix24 task and chat counters from bitrix24-exporter, per user and"
        " per department, and the exporter's own health.",
        "tags": ["bitrix24", "bitrix24-exporter"],
        "schemaVersion": 41,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "1m",
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables()},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python tools/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
