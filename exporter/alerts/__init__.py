"""Alert delivery into Bitrix24: Alertmanager's webhook in, chat messages and notifications out.

Alertmanager posts a notification (one group of alerts) to `POST /alerts/{receiver}`; the
receiver turns it into one BB-code chat message (`im.message.add`) and short personal
notifications (`im.notify.system.add`) for the people the alerts concern, sent through the
portal's own `BitrixClient`, so its rate limit, operating budget, retries and request
counters apply to them as to polling.

- `payload`: the webhook body (version 4) -> frozen `Notification`, or a one-line reason.
- `messages`: pure BB-code formatting of chat messages and personal notifications.
- `memory`: what was delivered recently (exactly once within a window) and the per-minute cap.
- `people`: who an alert concerns: user names, department heads (where the teams feature
  provides them).
- `delivery`: one receiver: which targets a notification goes to, sending, outcomes.
- `route`: the aiohttp handler: bearer token, body bound, status codes.
"""
