"""The command line: size and check-config (the demo has its own end-to-end test)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from poolwarden.cli import app

runner = CliRunner()


def test_size_prints_per_worker_settings_with_the_arithmetic() -> None:
    result = runner.invoke(app, ["size", "--cores", "4", "--workers", "4",
                                 "--max-connections", "100", "--rate", "800",
                                 "--query-time", "0.01"])
    assert result.exit_code == 0, result.output
    assert "DB_POOL_SIZE=3" in result.output
    assert "Little's law" in result.output


def test_size_fails_when_the_budget_cannot_hold_the_workers() -> None:
    result = runner.invoke(app, ["size", "--cores", "4", "--workers", "200",
                                 "--max-connections", "100"])
    assert result.exit_code == 1
    assert "PgBouncer" in result.output


def test_size_rejects_bad_input_naming_it() -> None:
    result = runner.invoke(app, ["size", "--cores", "0", "--workers", "2"])
    assert result.exit_code == 2
    assert "cores" in result.output


def test_check_config_lists_values_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:Sup3rSecret@db:5432/app")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    result = runner.invoke(app, ["check-config"])
    assert result.exit_code == 0, result.output
    assert "Sup3rSecret" not in result.output
    assert "DB_POOL_SIZE" in result.output


def test_check_config_reports_every_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:Sup3rSecret@db:5432/app")
    monkeypatch.setenv("DB_POOL_SIZE", "-1")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "soon")
    result = runner.invoke(app, ["check-config"])
    assert result.exit_code == 2
    assert "DB_POOL_SIZE" in result.output
    assert "DB_POOL_TIMEOUT" in result.output
    assert "Sup3rSecret" not in result.output
