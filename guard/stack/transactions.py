"""Kafka's transaction tool (``org.apache.kafka.tools.TransactionsCommand``, i.e. ``kafka-transactions.sh``)
through the stack's java and the broker's jars (``kafka-tools`` is in the broker's Maven fetch).

* `find_hanging` lists transactions that are open on a partition although their coordinator no longer
  knows them — only those open longer than ``max_transaction_timeout_minutes``. A transaction the
  coordinator still tracks (e.g. it believes it is COMPLETE_COMMIT but a marker was skipped) is not
  reported until the coordinator forgets it; `describe_producers` shows every open transaction of a
  partition (``current_transaction_start_offset``).
* `abort` writes an abort marker for the transaction that starts at ``start_offset`` (works on any open
  transaction, hanging or not).

Failures raise `StackError` with the tail of the tool's stderr.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.jvm import classpath, java, logging_opts
from guard.stack.kafka_auth import write_command_config

TOOL = "org.apache.kafka.tools.TransactionsCommand"
#: A short-lived admin client: a small heap is enough and starts faster.
TOOL_HEAP = "128m"


@dataclass(frozen=True)
class HangingTransaction:
    """One row of ``find-hanging``."""

    topic: str
    partition: int
    producer_id: int
    producer_epoch: int
    coordinator_epoch: int
    start_offset: int
    last_timestamp_ms: int


@dataclass(frozen=True)
class ProducerState:
    """One row of ``describe-producers`` (None where the tool prints ``None``)."""

    producer_id: int
    producer_epoch: int
    latest_coordinator_epoch: int
    last_sequence: int
    last_timestamp_ms: int
    current_transaction_start_offset: int | None


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the tool's whitespace-aligned table, keyed by its header (first line whose first cell is
    ``Topic`` or ``ProducerId``). Lines before the header (warnings) are skipped; no header, no rows."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        cells = line.split()
        if cells[0] in ("Topic", "ProducerId"):
            header = cells
            rows = []
            for row in lines[i + 1:]:
                values = row.split()
                if len(values) != len(header):
                    raise StackError(f"unexpected line in {TOOL} output: {row!r} (header {header})")
                rows.append(dict(zip(header, values, strict=True)))
            return rows
    return []


def _opt_int(raw: str) -> int | None:
    return None if raw in ("None", "-1", "") else int(raw)


def parse_hanging(text: str) -> list[HangingTransaction]:
    return [HangingTransaction(topic=r["Topic"], partition=int(r["Partition"]), producer_id=int(r["ProducerId"]),
                               producer_epoch=int(r["ProducerEpoch"]),
                               coordinator_epoch=int(r["CoordinatorEpoch"]), start_offset=int(r["StartOffset"]),
                               last_timestamp_ms=int(r["LastTimestamp"]))
            for r in parse_table(text)]


def parse_producers(text: str) -> list[ProducerState]:
    return [ProducerState(producer_id=int(r["ProducerId"]), producer_epoch=int(r["ProducerEpoch"]),
                          latest_coordinator_epoch=int(r["LatestCoordinatorEpoch"]),
                          last_sequence=int(r["LastSequence"]), last_timestamp_ms=int(r["LastTimestamp"]),
                          current_transaction_start_offset=_opt_int(r["CurrentTransactionStartOffset"]))
            for r in parse_table(text)]


def _lib(cfg: StackConfig) -> Path:
    from guard.stack.artifacts import ensure_artifacts

    return ensure_artifacts(cfg).broker_lib


def _run(cfg: StackConfig, args: list[str], timeout: float = 120.0) -> str:
    """Run the tool against the stack's broker; its stdout, or StackError with the tail of its stderr."""
    log_config = cfg.home / "kafka" / "tools-log4j2.properties"
    if not cfg.kafka_version.startswith("3."):
        write_if_changed(log_config, render_asset("log4j2.properties", component="kafka-tools",
                                                  log_file=cfg.logs / "kafka-tools.log"))
    cmd = [java(), f"-Xmx{TOOL_HEAP}", *logging_opts(cfg.kafka_version, log_config),
           "-cp", classpath(_lib(cfg)), TOOL, "--bootstrap-server", cfg.bootstrap,
           "--command-config", str(write_command_config(cfg, "admin")), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"kafka-transactions {' '.join(args)}: no answer after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        err = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise StackError(f"kafka-transactions {' '.join(args)} failed (exit {proc.returncode}):\n{err}")
    return proc.stdout


def find_hanging(cfg: StackConfig, max_transaction_timeout_minutes: int = 1) -> list[HangingTransaction]:
    """Hanging transactions on the stack's broker (open longer than the timeout, unknown to the coordinator)."""
    return parse_hanging(_run(cfg, ["find-hanging", "--broker-id", str(cfg.broker_node_id),
                                    "--max-transaction-timeout", str(max_transaction_timeout_minutes)]))


def describe_producers(cfg: StackConfig, topic: str, partition: int) -> list[ProducerState]:
    """Active producers of one partition, with the start offset of each one's open transaction."""
    return parse_producers(_run(cfg, ["describe-producers", "--topic", topic, "--partition", str(partition)]))


def abort(cfg: StackConfig, topic: str, partition: int, start_offset: int) -> None:
    """Abort the open transaction of ``topic``/``partition`` that starts at ``start_offset``."""
    _run(cfg, ["abort", "--topic", topic, "--partition", str(partition), "--start-offset", str(start_offset)])
