"""Round-robin timing: what each contender gets, and in which order they run (no time is asserted)."""

from __future__ import annotations

from tnlayers.timing import round_robin


def _recording(names: str) -> tuple[dict[str, object], list[str]]:
    calls: list[str] = []
    return {name: (lambda name=name: calls.append(name)) for name in names}, calls


def test_every_contender_gets_one_sample_per_repeat_after_its_warmup() -> None:
    contenders, calls = _recording("abcd")
    times = round_robin(contenders, repeats=7, inner=3, warmup=2)
    assert set(times) == set("abcd") and all(len(t) == 7 and min(t) >= 0 for t in times.values())
    assert calls[:8] == list("aabbccdd")  # warm-up, in the given order
    assert sorted(calls[8:]) == sorted("abcd" * 21)


def test_the_order_is_shuffled_every_repeat_and_seeded() -> None:
    contenders, calls = _recording("abcdef")
    round_robin(contenders, repeats=12, warmup=0, seed=3)
    rounds = [tuple(calls[k : k + 6]) for k in range(0, len(calls), 6)]
    assert all(sorted(r) == list("abcdef") for r in rounds)  # each repeat runs everyone once
    assert len(set(rounds)) > 1  # ... not always in the same order,
    followers = {r[r.index("c") + 1] for r in rounds if r[-1] != "c"}
    assert len(followers) > 1  # so whatever runs after a given contender varies
    again, calls_again = _recording("abcdef")
    round_robin(again, repeats=12, warmup=0, seed=3)
    assert calls_again == calls  # and the same seed gives the same orders
