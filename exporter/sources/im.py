"""`im.counters.get`: the unread chat counters of the credential's own user.

The method reads only its caller's counters, so it is one command per credential: the
portal's own, and each extra per-user webhook in `im.webhooks`. Exported as::

    bitrix24_im_unread{portal="acme",user_id="1",counter="chat"} 4

and with `im.chats: true` also::

    bitrix24_im_chat_unread{portal="acme",user_id="1",section="chat",chat_id="12"} 2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from exporter.bitrix import Command
from exporter.config import ImSettings
from exporter.mapping import Sample, im_counter_samples
from exporter.metrics import IM_CHAT_UNREAD, IM_UNREAD, Family
from exporter.sources import Planned, check_method

METHOD = "im.counters.get"


class ImSource:
    """Unread chat counters of the credential's own user (config section `im`)."""

    name: ClassVar[str] = "im"
    method: ClassVar[str] = METHOD
    families: ClassVar[tuple[Family, ...]] = (IM_UNREAD, IM_CHAT_UNREAD)
    scopes: ClassVar[tuple[str, ...]] = ("im",)
    caller_only: ClassVar[bool] = True

    def __init__(self, portal: str, settings: ImSettings) -> None:
        self.portal = portal
        self.settings = settings

    def plan(self, users: Sequence[int]) -> list[Planned]:
        return [Planned(Command(f"im_{user_id}", METHOD), user_id, self) for user_id in users]

    def samples(self, planned: Planned, result: object) -> list[Sample]:
        check_method(self, planned.command)
        return im_counter_samples(self.portal, planned.user_id, result, chats=self.settings.chats)

    def describe(self, command: Command) -> str:
        return "own counters"
