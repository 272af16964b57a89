"""The ``poolwarden`` command line (typer for the commands, rich for the output)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigurationError, PoolwardenError

app = typer.Typer(
    name="poolwarden", no_args_is_help=True, add_completion=False,
    help="PostgreSQL connection pools for async Python services: demo, configuration check.",
)
console = Console()


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(min=0.5, help="How long the workload runs.")] = 3.0,
    workers: Annotated[int, typer.Option(min=1, help="Concurrent tasks (> pool size).")] = 32,
) -> None:
    """Run a short concurrent workload through the pool and show what happened.

    Uses DATABASE_URL and the DB_* variables; with no DATABASE_URL it starts a throwaway
    PostgreSQL on a free loopback port and removes it afterwards.
    """
    from .demo import run_demo, summarise

    try:
        with console.status("running the workload..."):
            result = asyncio.run(run_demo(seconds=seconds, workers=workers))
    except ConfigurationError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    except PoolwardenError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    where = "embedded PostgreSQL (removed)" if result.embedded else result.target
    console.print(f"[bold]poolwarden demo[/bold] against {where}")
    console.print(
        f"{result.operations} operations in {result.duration_s:.2f} s "
        f"= [bold]{result.throughput:,.0f} ops/s[/bold] with {workers} tasks"
    )
    table = Table("kind", "count", "p50 ms", "p99 ms", "mean ms", title="latency")
    for kind, count, p50, p99, mean in summarise(result):
        table.add_row(kind, str(count), f"{p50:.2f}", f"{p99:.2f}", f"{mean:.2f}")
    console.print(table)
    stats = Table("stat", "value", title="pool stats (current, then cumulative *_total)")
    for key, value in result.stats.items():
        stats.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    console.print(stats)
    if result.errors:
        console.print(f"[yellow]errors: {dict(result.errors)}[/yellow]")


@app.command("check-config")
def check_config() -> None:
    """Validate DATABASE_URL and the DB_* variables; list every value and where it came from."""
    from .settings import DatabaseSettings

    try:
        settings = DatabaseSettings.from_env()
    except ConfigurationError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    table = Table("variable", "value", "source", title="poolwarden configuration (valid)")
    for variable, value, source in settings.describe():
        table.add_row(variable, value, source)
    console.print(table)


@app.command()
def size(  # noqa: PLR0917 - typer maps each parameter to a command-line option
    cores: Annotated[int, typer.Option(help="CPU cores of the database server.")],
    workers: Annotated[int, typer.Option(help="Processes of this service, each with a pool.")],
    max_connections: Annotated[int, typer.Option(help="The server's max_connections.")] = 100,
    rate: Annotated[float | None, typer.Option(help="Requests/s needing the database.")] = None,
    query_time: Annotated[
        float | None, typer.Option(help="Seconds each use holds a connection.")
    ] = None,
    other_connections: Annotated[int, typer.Option(help="Connections of other clients.")] = 0,
) -> None:
    """Recommend pool_size / max_overflow / min_size per worker, with the arithmetic shown."""
    from .sizing import SizingError, recommend

    try:
        result = recommend(
            cores=cores, workers=workers, max_connections=max_connections, rate_per_s=rate,
            query_time_s=query_time, other_connections=other_connections,
        )
    except SizingError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    colour = "green" if result.ok else "red"
    console.print(
        f"[{colour}]per worker: DB_POOL_SIZE={result.pool_size} "
        f"DB_MAX_OVERFLOW={result.max_overflow} DB_POOL_MIN_SIZE={result.min_size}[/{colour}]"
    )
    for reason in result.reasons:
        console.print(f"- {reason}")
    if not result.ok:
        raise typer.Exit(1)


def main() -> None:
    app()
