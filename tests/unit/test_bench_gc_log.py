"""The bench lines up latency stalls with the local broker's GC pauses: reading `kafka-gc.log`."""

import datetime as dt

from guard.bench.latency import broker_gc_pauses

LOG = """\
[2026-12-01T17:07:18.482+0000][527.195s] Using G1
[2026-12-01T17:07:19.609+0000][528.322s] GC(179) Pause Young (Normal) (G1 Evacuation Pause) 335M->141M(1024M) 15.447ms
[2026-12-01T17:07:20.100+0000][528.813s] GC(180) Concurrent Mark Cycle 283.052ms
[2026-12-01T17:07:21.250+0000][529.963s] GC(180) Pause Remark 518M->243M(1024M) 14.266ms
[2026-12-01T19:07:26.112+0200][534.825s] GC(182) Pause Young (Normal) (G1 Evacuation Pause) 341M->142M(1024M) 125.970ms
[2026-12-01T17:07:40.000+0000][548.713s] GC(190) Pause Young (Normal) (G1 Evacuation Pause) 341M->142M(1024M) 20.000ms
"""


def test_pauses_in_the_window_relative_to_its_start(tmp_path):
    log = tmp_path / "kafka-gc.log"
    log.write_text(LOG)
    start = dt.datetime(2026, 12, 1, 17, 7, 19, tzinfo=dt.UTC).timestamp()

    pauses = broker_gc_pauses(log, start, start + 10)

    # Young and remark pauses stop the broker; the concurrent cycle does not; the +0200 line is 17:07:26 UTC;
    # the pause at 17:07:40 ended after the window.
    assert pauses == [[0.609, 15.447], [2.25, 14.266], [7.112, 125.97]]


def test_a_missing_log_gives_no_pauses(tmp_path):
    assert broker_gc_pauses(tmp_path / "absent.log", 0, 1e12) == []


def test_a_pause_in_the_rotated_file_counts_too(tmp_path):
    log = tmp_path / "kafka-gc.log"
    (tmp_path / "kafka-gc.log.0").write_text(LOG.splitlines()[1] + "\n")
    log.write_text(LOG.splitlines()[-1] + "\n")
    start = dt.datetime(2026, 12, 1, 17, 7, 19, tzinfo=dt.UTC).timestamp()

    assert broker_gc_pauses(log, start, start + 30) == [[0.609, 15.447], [21.0, 20.0]]


def test_zgc_pauses_count_and_its_concurrent_phases_do_not(tmp_path):
    """The stack's broker runs ZGC, logged with `gc+phases`: its three short pauses per cycle are pauses."""
    log = tmp_path / "kafka-gc.log"
    log.write_text("""\
[2026-12-01T17:07:19.237+0000][0.237s] GC(0) Pause Mark Start 0.006ms
[2026-12-01T17:07:19.240+0000][0.240s] GC(0) Concurrent Mark 2.815ms
[2026-12-01T17:07:19.247+0000][0.247s] GC(0) Pause Mark End 0.007ms
[2026-12-01T17:07:19.250+0000][0.250s] GC(0) Concurrent Relocate 1.532ms
[2026-12-01T17:07:19.254+0000][0.254s] GC(0) Pause Relocate Start 0.005ms
[2026-12-01T17:07:19.300+0000][0.300s] GC(0) Garbage Collection (Warmup) 946M(92%)->142M(14%)
""")
    start = dt.datetime(2026, 12, 1, 17, 7, 19, tzinfo=dt.UTC).timestamp()

    assert broker_gc_pauses(log, start, start + 1) == [[0.237, 0.006], [0.247, 0.007], [0.254, 0.005]]
