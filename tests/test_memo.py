"""BoundedMemo: kept answers, a hard bound, and no caching of failures or unhashable keys."""

from __future__ import annotations

import pytest

from cds_service.memo import BoundedMemo


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
