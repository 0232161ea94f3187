"""The metric catalogue: every family the exporter serves, with its HELP, type and labels.

Names and labels are a public contract (the dashboard and the alert rules use them), so
they are written down once here and everything else refers to these objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["gauge", "counter", "histogram"]

CACHED = (
    " Cached: refreshed by a background poll every poll interval, not at scrape time"
    " (see bitrix24_last_success_timestamp_seconds for the data age)."
)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its name without suffixes, help text, kind and label names."""

    name: str
    help: str
    kind: MetricKind
    labels: tuple[str, ...]


IM_UNREAD = Family(
    "bitrix24_im_unread",
    "Unread chat counters of a user from im.counters.get TYPE, one per kind (lower-cased key)."
    " The kinds overlap (all = messenger + notify; messenger includes chat, dialog, lines):"
    " never sum them." + CACHED,
    "gauge",
    ("portal", "user_id", "counter"),
)
IM_CHAT_UNREAD = Family(
    "bitrix24_im_chat_unread",
    "Unread messages per chat from im.counters.get (section = chat, dialog, lines, ...;"
    " for dialogs chat_id is the other person's user id)." + CACHED,
    "gauge",
    ("portal", "user_id", "section", "chat_id"),
)
TASKS = Family(
    "bitrix24_tasks",
    "Task counters of a user from tasks.task.counters.get, per group and role, one per counter"
    " the portal returns (expired = overdue, new_comments = unread comments, ...)." + CACHED,
    "gauge",
    ("portal", "user_id", "group_id", "role", "counter", "code"),
)
USER_INFO = Family(
    "bitrix24_user_info",
    "Name of a watched Bitrix24 user, for joins in dashboards; always 1.",
    "gauge",
    ("portal", "user_id", "name"),
)
DEPARTMENT_INFO = Family(
    "bitrix24_department_info",
    "An active department from department.get: its name, its parent (empty for the root) and"
    " its head's user id (empty where it has none); always 1." + CACHED,
    "gauge",
    ("portal", "department_id", "name", "parent_id", "head_user_id"),
)
USER_DEPARTMENT = Family(
    "bitrix24_user_department",
    "A watched user is directly in this department (UF_DEPARTMENT of user.get); always 1." + CACHED,
    "gauge",
    ("portal", "user_id", "department_id"),
)
DEPARTMENT_TASKS = Family(
    "bitrix24_department_tasks",
    "Sum of bitrix24_tasks over the watched users in the department and all its"
    " sub-departments, each user once; users whose task counters are not exported do not"
    " count (see bitrix24_department_users)." + CACHED,
    "gauge",
    ("portal", "department_id", "group_id", "role", "counter"),
)
DEPARTMENT_IM_UNREAD = Family(
    "bitrix24_department_im_unread",
    "Sum of bitrix24_im_unread over the watched users in the department and all its"
    " sub-departments, each user once. The kinds overlap: never sum them." + CACHED,
    "gauge",
    ("portal", "department_id", "counter"),
)
DEPARTMENT_USERS = Family(
    "bitrix24_department_users",
    "How many users the department sums of a source cover (source tasks:"
    " bitrix24_department_tasks, im: bitrix24_department_im_unread), for averages per"
    " person." + CACHED,
    "gauge",
    ("portal", "department_id", "source"),
)
COLLECT_USERS = Family(
    "bitrix24_collect_users",
    "How many users a source fetches counters for (tasks: the watched users; im: the"
    " credentials' own users).",
    "gauge",
    ("portal", "source"),
)
COLLECT_SUCCESS_USERS = Family(
    "bitrix24_collect_success_users",
    "How many of bitrix24_collect_users the last poll cycle fetched successfully (the"
    " per-portal count of bitrix24_collect_success, which privacy mode aggregate leaves out).",
    "gauge",
    ("portal", "source"),
)
COLLECT_OLDEST_SUCCESS = Family(
    "bitrix24_collect_oldest_success_timestamp_seconds",
    "Unix time of the oldest last successful fetch among the users a source fetches for:"
    " the data age of the portal and source where privacy mode aggregate leaves out"
    " bitrix24_last_success_timestamp_seconds (only in that mode).",
    "gauge",
    ("portal", "source"),
)
UP = Family(
    "bitrix24_up",
    "1 if the last poll cycle reached the portal and authenticated, 0 otherwise.",
    "gauge",
    ("portal",),
)
COLLECT_SUCCESS = Family(
    "bitrix24_collect_success",
    "1 if the last poll cycle fetched this user's counters from this source (the Bitrix24"
    " method: tasks, im).",
    "gauge",
    ("portal", "user_id", "source"),
)
LAST_SUCCESS = Family(
    "bitrix24_last_success_timestamp_seconds",
    "Unix time of the last successful fetch of this user's counters from this source.",
    "gauge",
    ("portal", "user_id", "source"),
)
POLL_DURATION = Family(
    "bitrix24_poll_duration_seconds",
    "Duration of the last complete poll cycle of the portal.",
    "gauge",
    ("portal",),
)
POLL_BEHIND = Family(
    "bitrix24_poll_behind_seconds",
    "How late the last poll cycle started against its schedule (0 when the load fits the"
    " poll interval and the rate and operating limits).",
    "gauge",
    ("portal",),
)
POLL_INTERVAL = Family(
    "bitrix24_poll_interval_seconds",
    "Configured poll interval.",
    "gauge",
    (),
)
API_REQUESTS = Family(
    "bitrix24_api_requests",
    "HTTP requests sent to Bitrix24, by method and outcome (HTTP status, timeout or connection).",
    "counter",
    ("portal", "method", "code"),
)
API_ERRORS = Family(
    "bitrix24_api_errors",
    "Bitrix24 error codes received, including per-command errors inside batch responses.",
    "counter",
    ("portal", "method", "error"),
)
API_REQUEST_DURATION = Family(
    "bitrix24_api_request_duration_seconds",
    "Duration of HTTP requests to Bitrix24.",
    "histogram",
    ("portal",),
)
RATE_LIMIT_WAIT = Family(
    "bitrix24_rate_limit_wait_seconds",
    "Time spent waiting for the client-side leaky bucket or a QUERY_LIMIT_EXCEEDED backoff.",
    "counter",
    ("portal",),
)
API_OPERATING = Family(
    "bitrix24_api_operating_seconds",
    "Method execution time Bitrix24 counted against the operating limit in its current window"
    " (time.operating of the last response).",
    "gauge",
    ("portal", "method"),
)
API_OPERATING_LIMIT = Family(
    "bitrix24_api_operating_limit_seconds",
    "Configured per-method operating time budget per 10 minutes.",
    "gauge",
    ("portal",),
)
BUILD_INFO = Family(
    "bitrix24_exporter_build_info",
    "Version of the exporter and of Python; always 1.",
    "gauge",
    ("version", "python_version"),
)
SHARD = Family(
    "bitrix24_exporter_shard",
    "This process's shard: it polls the portals whose stable hash modulo count equals index.",
    "gauge",
    ("index", "count"),
)
RELOAD_OK = Family(
    "bitrix24_config_last_reload_successful",
    "1 if the last configuration (re)load succeeded.",
    "gauge",
    (),
)
RELOAD_TIME = Family(
    "bitrix24_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful configuration load.",
    "gauge",
    (),
)

ALERT_NOTIFICATIONS = Family(
    "bitrix24_alert_notifications",
    "Alertmanager notifications received by an alert receiver (POST /alerts/{receiver}),"
    " by status (firing, resolved); retries and repeats count again.",
    "counter",
    ("receiver", "status"),
)
ALERT_DELIVERIES = Family(
    "bitrix24_alert_deliveries",
    "Sends of alert notifications into Bitrix24 by an alert receiver, by target (chat: the"
    " chat message, user: a personal notification) and outcome (ok, failed, duplicate: not"
    " sent again because it was delivered within the window).",
    "counter",
    ("receiver", "target", "outcome"),
)

# Histogram buckets for request durations: Bitrix24 answers in tens of milliseconds to
# tens of seconds (a cloud request may run for at most 60 s).
DURATION_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Order in which portal-scoped families appear in the exposition: these, then each source's
# families (exporter.sources.source_families), then the client's own.
PORTAL_HEAD_FAMILIES: tuple[Family, ...] = (
    UP,
    POLL_DURATION,
    POLL_BEHIND,
    COLLECT_USERS,
    COLLECT_SUCCESS_USERS,
    COLLECT_OLDEST_SUCCESS,
    COLLECT_SUCCESS,
    LAST_SUCCESS,
    USER_INFO,
)
PORTAL_TAIL_FAMILIES: tuple[Family, ...] = (
    API_REQUESTS,
    API_ERRORS,
    API_REQUEST_DURATION,
    RATE_LIMIT_WAIT,
    API_OPERATING,
    API_OPERATING_LIMIT,
)
