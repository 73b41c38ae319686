"""The shared batch policy: block only for the first record, then take what is fetched; commit when caught up."""

from guard.kafka.batching import commit_due, take


class _Queue:
    """Stands in for a consumer's fetched-message queue (pure logic: what `take` asks of it)."""

    def __init__(self, items: list[str]) -> None:
        self.items = list(items)
        self.waits: list[float] = []

    def poll(self, timeout: float):
        self.waits.append(timeout)
        return self.items.pop(0) if self.items else None

    def consume(self, num_messages: int, timeout: float):
        assert timeout == 0, "take() must never block in consume()"
        out, self.items = self.items[:num_messages], self.items[num_messages:]
        return out


def test_idle_loop_blocks_for_the_first_record_then_drains_without_waiting():
    queue = _Queue(["a", "b", "c"])
    msgs, drained = take(queue, 10, 0.1)  # type: ignore[arg-type]
    assert msgs == ["a", "b", "c"] and drained and queue.waits == [0.1]


def test_a_full_batch_is_not_drained():
    queue = _Queue(list("abcdef"))
    msgs, drained = take(queue, 4, 0.1)  # type: ignore[arg-type]
    assert msgs == list("abcd") and not drained
    msgs, drained = take(queue, 2, 0)  # type: ignore[arg-type]
    assert msgs == list("ef") and not drained
    msgs, drained = take(queue, 2, 0)  # type: ignore[arg-type]
    assert msgs == [] and drained


def test_nothing_arrives():
    assert take(_Queue([]), 5, 0.05) == ([], True)  # type: ignore[arg-type]


def test_commit_when_caught_up_full_or_old():
    base = {"records": 10, "batch_size": 100, "age_s": 0.01, "batch_s": 0.1}
    assert not commit_due(drained=False, **base)
    assert commit_due(drained=True, **base)
    assert commit_due(drained=False, **{**base, "records": 100})
    assert commit_due(drained=False, **{**base, "age_s": 0.1})
