"""The local stack's KRaft layout: properties of both nodes, the crash wait, the old combined layout."""

from pathlib import Path

import pytest

from guard.stack.config import StackConfig
from guard.stack.kraft import (
    broker_properties,
    controller_properties,
    fence_wait_seconds,
    is_combined_layout,
    meta_node_id,
    parse_properties,
)


@pytest.fixture
def cfg(tmp_path: Path) -> StackConfig:
    return StackConfig(home=tmp_path / "home", cache=tmp_path / "cache", kafka_port=29092, controller_port=29093)


def test_broker_is_broker_only_and_votes_for_the_separate_controller(cfg: StackConfig) -> None:
    p = parse_properties(broker_properties(cfg, Path("/d/data")))
    assert p["process.roles"] == "broker"
    assert p["node.id"] == "1"
    assert p["controller.quorum.voters"] == "100@127.0.0.1:29093"
    # no CONTROLLER listener on the broker; issue 20: SASL_SSL for clients, mutual TLS inside, no PLAINTEXT
    assert p["listeners"] == "SASL_SSL://127.0.0.1:29092,INTERNAL://127.0.0.1:29094"
    assert p["controller.listener.names"] == "CONTROLLER"
    assert "CONTROLLER:SSL" in p["listener.security.protocol.map"]
    assert p["log.dirs"] == "/d/data"
    assert p["broker.session.timeout.ms"] == "9000"
    assert p["transaction.state.log.replication.factor"] == "1"


def test_controller_is_controller_only_and_the_single_voter(cfg: StackConfig) -> None:
    p = parse_properties(controller_properties(cfg, Path("/d/controller")))
    assert p["process.roles"] == "controller"
    assert p["node.id"] == "100"
    assert p["controller.quorum.voters"] == "100@127.0.0.1:29093"
    assert p["listeners"] == "CONTROLLER://127.0.0.1:29093"
    assert p["log.dirs"] == "/d/controller"
    assert p["broker.session.timeout.ms"] == "9000"
    assert "advertised.listeners" not in p


def test_session_timeout_is_one_setting_for_both_nodes(tmp_path: Path) -> None:
    cfg = StackConfig(home=tmp_path, cache=tmp_path, broker_session_timeout_ms=6000)
    assert parse_properties(broker_properties(cfg, tmp_path))["broker.session.timeout.ms"] == "6000"
    assert parse_properties(controller_properties(cfg, tmp_path))["broker.session.timeout.ms"] == "6000"


# --- crash wait -------------------------------------------------------------------------------
def test_killed_long_ago_no_wait() -> None:
    assert fence_wait_seconds(now=1000.0, died_at=980.0, controller_since=100.0, session_timeout_ms=9000,
                              margin_s=3.0) == 0.0


def test_killed_recently_waits_the_rest_of_session_plus_margin() -> None:
    assert fence_wait_seconds(now=1002.0, died_at=1000.0, controller_since=100.0, session_timeout_ms=9000,
                              margin_s=3.0) == pytest.approx(10.0)


def test_unknown_death_waits_the_full_timeout_from_now() -> None:
    assert fence_wait_seconds(now=1000.0, died_at=None, controller_since=100.0, session_timeout_ms=9000,
                              margin_s=3.0) == pytest.approx(12.0)


def test_controller_started_after_the_death_counts_from_its_start() -> None:
    # A fresh controller gives the dead broker's registration a fresh session when it replays its log.
    assert fence_wait_seconds(now=1005.0, died_at=900.0, controller_since=1004.0, session_timeout_ms=9000,
                              margin_s=3.0) == pytest.approx(11.0)


def test_death_time_in_the_future_is_clamped_to_now() -> None:
    assert fence_wait_seconds(now=1000.0, died_at=1500.0, controller_since=None, session_timeout_ms=9000,
                              margin_s=0.0) == pytest.approx(9.0)


# --- old combined layout -------------------------------------------------------------------------
def _meta(d: Path, node: int) -> None:
    d.mkdir(parents=True)
    (d / "meta.properties").write_text(f"#\nnode.id={node}\nversion=1\ncluster.id=abc\n")


def test_combined_layout_from_rendered_properties(tmp_path: Path) -> None:
    data, ctl, props = tmp_path / "data", tmp_path / "controller", tmp_path / "server.properties"
    _meta(data, 1)
    _meta(ctl, 100)
    props.write_text("process.roles=broker,controller\nnode.id=1\n")
    assert meta_node_id(data) == 1
    assert is_combined_layout(data, ctl, props)


def test_combined_layout_from_a_formatted_broker_without_controller(tmp_path: Path) -> None:
    data, ctl, props = tmp_path / "data", tmp_path / "controller", tmp_path / "server.properties"
    _meta(data, 1)
    props.write_text("process.roles=broker\n")
    assert is_combined_layout(data, ctl, props)


def test_split_layout_and_empty_home_are_not_combined(tmp_path: Path) -> None:
    data, ctl, props = tmp_path / "data", tmp_path / "controller", tmp_path / "server.properties"
    assert not is_combined_layout(data, ctl, props)  # nothing formatted: nothing to migrate
    props.write_text("process.roles=broker,controller\n")
    assert not is_combined_layout(data, ctl, props)
    _meta(data, 1)
    _meta(ctl, 100)
    props.write_text("process.roles=broker\n")
    assert not is_combined_layout(data, ctl, props)
