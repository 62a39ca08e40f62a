"""BoundedMemo: kept answers, a hard bound, and no caching of failures or unhashable keys."""

from __future__ import annotations

import pytest

from cds_service.memo import BoundedMemo, cached_property


def test_keeps_answers_and_stays_bounded() -> None:
    memo: BoundedMemo[int] = BoundedMemo(max_entries=3)
    calls: list[int] = []

    def square(n: int) -> int:
        calls.append(n)
        return n * n

    assert [memo.get(n, lambda n=n: square(n)) for n in (2, 2, 3, 2)] == [4, 4, 9, 4]
    assert calls == [2, 3]
    for n in range(10):
        memo.get(n, lambda n=n: square(n))
        assert len(memo) <= 3


def test_failures_and_unhashable_keys_are_not_kept() -> None:
    memo: BoundedMemo[int] = BoundedMemo()
    with pytest.raises(ZeroDivisionError):
        memo.get("x", lambda: 1 // 0)
    assert memo.get("x", lambda: 7) == 7
    assert memo.get(["unhashable"], lambda: 8) == 8 and len(memo) == 1


def test_seen_before_remembers_keys_over_two_bounded_generations() -> None:
    from cds_service.memo import SeenBefore

    seen = SeenBefore(3)
    assert [seen.check(k) for k in ("a", "b", "a")] == [False, False, True]
    for k in ("c", "d", "e", "f"):  # "c" fills the newer generation: it becomes the older one
        assert not seen.check(k)
    assert seen.check("d") and not seen.check("a")  # "a" was in the generation forgotten when "f" filled one
    assert len(seen.newer) < 3 and len(seen.older) == 3 and len(seen) <= 6
    seen.clear()
    assert len(seen) == 0 and not seen.check("d")


def test_cached_property_computes_once_per_instance_and_stores_the_value() -> None:
    class Thing:
        calls = 0

        def __init__(self, n: int) -> None:
            self.n = n

        @cached_property
        def double(self) -> int:
            """Twice n."""
            Thing.calls += 1
            return 2 * self.n

    one, two = Thing(1), Thing(5)
    assert (one.double, one.double, two.double, two.double) == (2, 2, 10, 10)
    assert Thing.calls == 2  # once per instance
    assert one.__dict__["double"] == 2  # stored on the instance: later reads never reach the descriptor
    assert isinstance(Thing.__dict__["double"], cached_property) and Thing.double.__doc__ == "Twice n."

    class Broken:
        @cached_property
        def value(self) -> float:
            return 1 / 0

    broken = Broken()
    with pytest.raises(ZeroDivisionError):  # an error is raised and nothing is stored
        _ = broken.value
    assert "value" not in broken.__dict__
