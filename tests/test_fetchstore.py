"""The fetch store against a plain model of its rules: whatever the order of successes,
failures, users leaving and snapshots, it holds each command's last good samples (until
they are stale), in the order the commands were first seen."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.fetchstore import FetchStore
from exporter.mapping import Sample
from exporter.metrics import IM_CHAT_UNREAD, IM_UNREAD, TASKS

STALE_AFTER = 30.0
KEYS = [f"k{i}" for i in range(8)]


def samples_of(key: str, variant: int) -> list[Sample]:
    """What a command may return: task counters, im counters of two families, or nothing."""
    if variant == 0:
        return []
    if key.endswith(("0", "5")):  # these commands are im.counters.get
        found = [Sample(IM_UNREAD, ("p", key, "chat"), float(variant))]
        if variant % 2:
            found.append(Sample(IM_CHAT_UNREAD, ("p", key, "chat", str(variant)), 1.0))
        return found
    return [
        Sample(TASKS, ("p", key, "0", "view_all", f"c{n}", str(n)), float(variant + n))
        for n in range(variant % 3 + 1)
    ]


class Model:
    """The rules, kept the simple way: samples per key in a dict."""

    def __init__(self) -> None:
        self.fetches: dict[str, tuple[list[Sample], float | None]] = {}

    def succeed(self, key: str, samples: list[Sample], now: float) -> None:
        self.fetches[key] = (samples, now)

    def fail(self, key: str, now: float) -> None:
        _, last = self.fetches.setdefault(key, ([], None))
        if last is None or now - last > STALE_AFTER:
            self.fetches[key] = ([], last)

    def keep_only(self, keys: set[str]) -> None:
        for key in [k for k in self.fetches if k not in keys]:
            del self.fetches[key]

    def samples(self) -> list[Sample]:
        return [s for samples, _ in self.fetches.values() for s in samples]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("succeed"), st.sampled_from(KEYS), st.integers(0, 6)),
        st.tuples(st.just("fail"), st.sampled_from(KEYS), st.just(0)),
        st.tuples(st.just("fail_all"), st.just(""), st.just(0)),
        st.tuples(st.just("keep_only"), st.sets(st.sampled_from(KEYS)), st.just(0)),
        st.tuples(st.just("snapshot"), st.just(""), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, steps=st.lists(st.sampled_from([0.0, 1.0, 10.0, 29.0, 31.0]), min_size=60))
def test_store_keeps_what_the_rules_say(
    ops: list[tuple[str, Any, int]], steps: list[float]
) -> None:
    store, model = FetchStore(), Model()
    now = 1000.0
    for (op, key, variant), step in zip(ops, steps, strict=False):
        now += step
        if op == "succeed":
            store.succeed(key, samples_of(key, variant), now)
            model.succeed(key, samples_of(key, variant), now)
        elif op == "fail":
            store.fail(key, now, STALE_AFTER)
            model.fail(key, now)
        elif op == "fail_all":
            store.fail_all(now, STALE_AFTER)
            for known in list(model.fetches):
                model.fail(known, now)
        elif op == "keep_only":
            store.keep_only(key, ())
            model.keep_only(key)
        series = store.samples()
        expected = model.samples()
        for family in (TASKS, IM_UNREAD, IM_CHAT_UNREAD):
            mine = [s for s in series if s.family is family]
            assert mine == [s for s in expected if s.family is family], (op, key, family.name)
        assert list(store.slots) == list(model.fetches)
        for known, (_, last) in model.fetches.items():
            assert store.last_fetch(known) == last


def test_many_users_leaving_and_coming_back() -> None:
    """Slots of dropped keys are reused after a compaction without disturbing the others."""
    store = FetchStore()
    for round_ in range(5):
        keys = [f"u{round_}_{i}t" for i in range(50)] + ["stay"]  # task commands
        for key in keys:
            store.succeed(key, samples_of(key, 1 + round_ % 5), float(round_))
        store.keep_only(set(keys), ())
        lines = [s.labels[1] for s in store.samples()]
        per_key = 1 + (1 + round_ % 5) % 3
        # "stay" was first seen in round 0, before the keys of later rounds.
        order = keys if round_ == 0 else ["stay", *keys[:50]]
        assert lines == [k for k in order for _ in range(per_key)]
        assert len(store.slots) == 51
