"""`guard bench`."""

from __future__ import annotations

from pathlib import Path

import click

from guard.cli.main import _settings, main
from guard.errors import GuardError


@main.command("bench")
@click.option("--records", default=200_000, show_default=True)
@click.option("--partitions", default=2, show_default=True)
@click.option("--workers", default=1, show_default=True)
@click.option("--trials", default=3, show_default=True,
              help="Throughput trials per mode, alternating plain and guard; each mode's median counts.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--latency-seconds", type=float, default=None,
              help="Measured seconds of each latency phase, after 5 s of paced warm-up (default 20 s).")
@click.option("--warmup-seconds", type=float, default=None,
              help="Untimed plain and guard drains before the trials (default 45 s; none below 50k records; "
                   "0 for none).")
@click.option("--scaling", is_flag=True, help="Also run the guard with 1 then 2 workers on 2 partitions.")
@click.option("--soak", type=float, default=0.0, metavar="SECONDS",
              help="Also run a steady 50%-rate soak and report RSS drift (the memory target needs 600).")
@click.option("--keep", is_flag=True, help="Keep the bench topics, groups and keys.")
@click.option("--workload", type=click.Choice(["realistic", "hot"]), default="realistic", show_default=True,
              help="realistic: a branch day over every demo table, Zipf-skewed over --customers; hot: customers "
                   "only, 4,000 customers, nearly every key cached (the earlier benches' workload).")
@click.option("--customers", type=int, default=None,
              help="Customer population (default 1,000,000 for realistic, 4,000 for hot).")
@click.option("--key-cache-ttl", type=float, default=None,
              help="The guard workers' data-key cache TTL in seconds (default 10 for realistic, so keys expire "
                   "inside the measured windows; the guard's default for hot).")
@click.pass_context
def bench(ctx: click.Context, records: int, partitions: int, workers: int, trials: int, json_out: Path | None,
          latency_seconds: float | None, warmup_seconds: float | None, scaling: bool, soak: float,
          keep: bool, workload: str, customers: int | None, key_cache_ttl: float | None) -> None:
    """Plain consume-produce vs the guard on the same records; last line `ratio <guard/plain>`."""
    from guard.bench.run import run_bench

    try:
        run_bench(_settings(ctx), records=records, partitions=partitions, workers=workers, json_out=json_out,
                  latency_seconds=latency_seconds, scaling=scaling, soak_seconds=soak, keep=keep, trials=trials,
                  warmup_seconds=warmup_seconds, workload=workload, customers=customers,
                  key_cache_ttl=key_cache_ttl)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
