"""`RewindCheck`: a seek back is confirmed by the next record fetched from its partition, never trusted."""

from __future__ import annotations

import pytest

from guard.kafka.rewinds import CONFIRM_S, RewindCheck, RewindLostError


def fetched(*records: tuple[str, int, int]) -> list[tuple[None, str, int, int, None]]:
    return [(None, topic, partition, offset, None) for topic, partition, offset in records]


def test_the_next_record_at_or_before_the_known_one_confirms_the_rewind() -> None:
    check = RewindCheck()
    check.expect("raw", 0, 10, 14)  # back to 10; a record at 14 was taken before
    check.expect("raw", 1, 7, 7)
    check.confirm(fetched(("raw", 0, 12)))  # 10 and 11 compacted away or markers: still before 14
    assert check  # partition 1 has fetched nothing yet
    check.confirm(fetched(("other", 0, 99), ("raw", 1, 7), ("raw", 1, 50)))
    assert not check  # only a partition's first record counts


def test_a_record_past_the_known_one_means_the_seek_did_not_happen() -> None:
    check = RewindCheck()
    check.expect("raw", 0, 654, 654)  # a delete held back: the seek goes back to it
    with pytest.raises(RewindLostError, match=r"raw\[0\] was rewound to offset 654.*at 656"):
        check.confirm(fetched(("raw", 0, 656)))


def test_a_rewound_partition_that_fetches_nothing_is_overdue() -> None:
    now = [100.0]
    check = RewindCheck(clock=lambda: now[0])
    check.expect("raw", 2, 5, 9)
    now[0] += CONFIRM_S - 1
    check.check_overdue()
    now[0] += 2
    with pytest.raises(RewindLostError, match="has fetched nothing"):
        check.check_overdue()


def test_revoked_partitions_and_rebuilt_clients_forget_their_rewinds() -> None:
    check = RewindCheck()
    check.expect("raw", 0, 1, 1)
    check.expect("raw", 1, 1, 1)
    check.forget([("raw", 0)])
    check.confirm(fetched(("raw", 0, 500)))  # resumed from the committed offsets elsewhere: not checked
    assert check
    check.forget()
    assert not check
    check.expect("raw", 1, 8, 3)  # a known record before the target counts as the target itself
    with pytest.raises(RewindLostError):
        check.confirm(fetched(("raw", 1, 9)))
