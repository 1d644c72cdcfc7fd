"""qbert.timing's side-by-side timer: every fn is sampled once per round, the first one rotating, after the
warm-up rounds; bad arguments are refused."""

import pytest

from qbert import timing


def test_rounds_rotate_and_sample_every_fn():
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = timing.round_robin_samples(fns, warmup=1, repeats=3)
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t > 0 for s in samples.values() for t in s)
    assert order[:3] == ["a", "b", "c"]  # the warm-up round
    # Each timed round starts one fn later; fns this fast repeat within a sample (MIN_BATCH_S), so the
    # timed calls are runs of one name each.
    timed = order[3:]
    runs = [name for i, name in enumerate(timed) if i == 0 or timed[i - 1] != name]
    assert runs == ["b", "c", "a", "c", "a", "b", "a", "b", "c"]
    medians = timing.time_round_robin(fns, warmup=0, repeats=2)
    assert set(medians) == set(fns) and all(us > 0 for us in medians.values())


@pytest.mark.parametrize(("fns", "warmup", "repeats"), [({}, 1, 1), ({"a": int}, -1, 1), ({"a": int}, 0, 0)])
def test_bad_arguments_are_refused(fns, warmup, repeats):
    with pytest.raises(ValueError, match="round_robin_samples: need fns"):
        timing.round_robin_samples(fns, warmup, repeats)
