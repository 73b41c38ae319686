"""The bench's CPU per event of the whole machine and of the local stack's processes: readings sampled
through the run, each window's ends interpolated between the samples around them."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from guard.bench.report import render_stack_cpu
from guard.bench.stackcpu import Sample, StackCpuSampler, cpu_in_window, names_stack_redis


def _samples() -> list[Sample]:
    # broker at 0.5 core, key store at 0.25 core, machine 1.5 of 2 cores busy, from t=100 on.
    return [Sample(100.0 + i, {"broker": 0.5 * i, "key store": 0.25 * i}, 1.5 * i, 2.0 * i) for i in range(11)]


def test_a_window_between_samples_is_interpolated_at_both_ends() -> None:
    window = cpu_in_window(_samples(), 101.5, 105.5)
    assert window is not None
    assert window.seconds == pytest.approx(4.0)
    assert window.processes == {"broker": pytest.approx(2.0), "key store": pytest.approx(1.0)}
    assert (window.busy, window.total) == (pytest.approx(6.0), pytest.approx(8.0))
    per = window.per_event(1000)  # 4 s of which the broker spent 2 CPU-s on 1,000 events: 2,000 µs each
    assert per == {"broker": pytest.approx(2000.0), "key store": pytest.approx(1000.0),
                   "machine": pytest.approx(6000.0), "machine_busy_share": pytest.approx(0.75)}


def test_a_window_the_samples_do_not_cover_has_no_figure() -> None:
    samples = _samples()
    assert cpu_in_window(samples, 99.0, 105.0) is None  # started before the first sample
    assert cpu_in_window(samples, 105.0, 111.0) is None  # ends after the last
    assert cpu_in_window(samples, 105.0, 105.0) is None
    assert cpu_in_window(samples[:1], 100.0, 100.0) is None


def test_a_process_unreadable_at_one_end_is_left_out_not_counted_as_zero() -> None:
    samples = _samples()
    samples[8] = Sample(108.0, {"broker": 4.0}, 12.0, 16.0)  # the key store stopped answering
    window = cpu_in_window(samples, 101.0, 108.0)
    assert window is not None
    assert set(window.processes) == {"broker"}


def test_the_sampler_reads_a_real_processs_cpu_and_the_machines() -> None:
    sampler = StackCpuSampler({"this test": os.getpid()}, interval=0.02)
    try:
        while len(sampler.samples) < 2:
            time.sleep(0.01)
        start = time.time()
        spent = time.process_time()
        while time.process_time() - spent < 0.2:  # keep one core busy for 0.2 s
            pass
        end = time.time()
        window = sampler.window(start, end)  # waits for the sample after `end`
    finally:
        sampler.close()
    assert window is not None
    assert 0.1 < window.processes["this test"] <= window.busy + 0.05
    assert window.busy <= window.total


def test_a_process_gone_before_the_sampler_starts_is_left_out() -> None:
    gone = psutil.Popen(["true"])
    gone.wait()
    sampler = StackCpuSampler({"gone": gone.pid, "this test": os.getpid()}, interval=0.02)
    try:
        while len(sampler.samples) < 1:
            time.sleep(0.01)
    finally:
        sampler.close()
    assert set(sampler.samples[0].cpu) == {"this test"}


def test_the_report_line_gives_each_modes_machine_total_and_its_parts() -> None:
    def mode(worker: float, broker: float, store: float, machine: float, busy: float) -> dict[str, object]:
        return {"cpu_us_per_event": worker, "stack_cpu_us_per_event": {
            "broker": broker, "key store": store, "machine": machine, "machine_busy_share": busy}}

    report = {"modes": {"plain": mode(4.4, 7.0, 0.0, 13.0, 0.72), "guard": mode(30.0, 13.0, 10.0, 52.0, 0.7),
                        "guard_first_sight": mode(33.0, 14.0, 11.0, 60.0, 0.71)}}
    line = render_stack_cpu(report)
    assert line is not None
    assert "plain 13.0 (worker 4.4, broker 7.0, key store 0.0; machine 72% busy)" in line
    assert "guard 52.0 (worker 30.0, broker 13.0, key store 10.0; machine 70% busy)" in line
    assert line.endswith("plain/guard 0.250")
    report["modes"]["guard"]["stack_cpu_us_per_event"] = {}  # against another stack: no line at all
    assert render_stack_cpu(report) is None


def test_only_the_stacks_own_redis_is_charged_to_the_key_store() -> None:
    stack = "rediss://guard@127.0.0.1:16379/0?ssl_ca_certs=/x/ca.crt&ssl_cert_reqs=required"
    assert names_stack_redis(stack, "127.0.0.1", 16379)
    assert not names_stack_redis("rediss://guard@10.0.0.5:16379/0", "127.0.0.1", 16379)  # same port, elsewhere
    assert not names_stack_redis("redis://127.0.0.1/0", "127.0.0.1", 16379)  # the default port
