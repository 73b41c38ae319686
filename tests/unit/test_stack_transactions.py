"""Parsing `kafka-transactions.sh` (TransactionsCommand) tables, as Kafka 4.3.1 prints them (tab-separated,
a trailing tab, header only when empty)."""

import pytest

from guard.stack.errors import StackError
from guard.stack.transactions import HangingTransaction, ProducerState, parse_hanging, parse_producers

HANGING = (
    "Topic\tPartition\tProducerId\tProducerEpoch\tCoordinatorEpoch\tStartOffset\tLastTimestamp\tDuration(min)\t\n"
    "wt18.txn\t0\t1000\t3\t2\t4711\t1764608838482\t17\t\n"
    "__consumer_offsets\t0\t1000\t3\t-1\t88\t1764608838482\t17\t\n"
)
PRODUCERS = (
    "ProducerId\tProducerEpoch\tLatestCoordinatorEpoch\tLastSequence\tLastTimestamp\tCurrentTransactionStartOffset\t\n"
    "1000\t3\t2\t41\t1764608838482\t4711\t\n"
    "1001\t0\t-1\t5\t1764608839000\tNone\t\n"
)


def test_hanging_rows() -> None:
    assert parse_hanging(HANGING) == [
        HangingTransaction("wt18.txn", 0, 1000, 3, 2, 4711, 1764608838482),
        HangingTransaction("__consumer_offsets", 0, 1000, 3, -1, 88, 1764608838482),
    ]


def test_header_only_or_nothing_means_none() -> None:
    assert parse_hanging(HANGING.splitlines()[0] + "\n") == []
    assert parse_hanging("") == []


def test_warnings_before_the_header_are_skipped() -> None:
    assert len(parse_hanging("WARN something about the admin client\n" + HANGING)) == 2


def test_producers_with_and_without_open_transaction() -> None:
    assert parse_producers(PRODUCERS) == [
        ProducerState(1000, 3, 2, 41, 1764608838482, 4711),
        ProducerState(1001, 0, -1, 5, 1764608839000, None),
    ]


def test_a_ragged_row_is_an_error_not_a_silent_skip() -> None:
    with pytest.raises(StackError, match="unexpected line"):
        parse_hanging(HANGING + "wt18.txn\t1\n")
