"""`department.get`: the company structure, and the department sums built on it.

Unlike the counter sources, departments are not asked per user and per cycle: the user
directory pages them on the user list's schedule (`user_refresh_interval`), the first page
alone to learn the total and the rest in `batch`, like `user.get`. This module says what
those commands are and how a page becomes records; `exporter.teams` turns the tree, each
user's `UF_DEPARTMENT` and a cycle's counters into the families below, once per cycle::

    bitrix24_department_info{portal="acme",department_id="2",name="Sales",parent_id="1",
                             head_user_id="2"} 1
    bitrix24_user_department{portal="acme",user_id="3",department_id="4"} 1
    bitrix24_department_tasks{portal="acme",department_id="2",group_id="0",role="view_all",
                              counter="expired"} 7
    bitrix24_department_im_unread{portal="acme",department_id="1",counter="messenger"} 4
    bitrix24_department_users{portal="acme",department_id="2",source="tasks"} 3
"""

from __future__ import annotations

from typing import ClassVar, Final

from exporter.bitrix import Command
from exporter.mapping import DepartmentRecord, parse_departments
from exporter.metrics import (
    DEPARTMENT_IM_UNREAD,
    DEPARTMENT_INFO,
    DEPARTMENT_TASKS,
    DEPARTMENT_USERS,
    USER_DEPARTMENT,
    Family,
)

METHOD: Final = "department.get"
SCOPE: Final = "department"


class DepartmentsSource:
    """The departments of a portal (config section `teams`)."""

    name: ClassVar[str] = "departments"
    method: ClassVar[str] = METHOD
    families: ClassVar[tuple[Family, ...]] = (
        DEPARTMENT_INFO,
        USER_DEPARTMENT,
        DEPARTMENT_TASKS,
        DEPARTMENT_IM_UNREAD,
        DEPARTMENT_USERS,
    )
    scopes: ClassVar[tuple[str, ...]] = (SCOPE,)

    def first(self) -> Command:
        """The first page, sent alone: its `total` tells how many pages follow."""
        return self.page(0)

    def page(self, start: int) -> Command:
        """
        >>> DepartmentsSource().page(50)
        Command(key='departments_50', method='department.get', params={'START': 50})
        """
        # Upper case: the portal reads its list parameters as written.
        return Command(f"departments_{start}", METHOD, {"START": start})

    def records(self, result: object) -> list[DepartmentRecord]:
        """One page's departments; raises PayloadError for a page it cannot read."""
        return parse_departments(result)

    def describe(self, command: Command) -> str:
        return f"departments from {command.params.get('START', 0)}"
