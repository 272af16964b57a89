"""The sizing rules (pure): worked examples checked by hand, and their guarantees as properties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolwarden.errors import ConfigurationError
from poolwarden.sizing import (
    ServerBudget,
    SizingError,
    budget_problems,
    cores_rule,
    littles_law,
    per_worker_split,
    recommend,
    service_budget,
)


def _bad_inputs(caught: pytest.ExceptionInfo[SizingError]) -> set[str]:
    return {p.variable for p in caught.value.problems}


# -- cores rule ------------------------------------------------------------------------------


def test_cores_rule_is_twice_the_cores_plus_effective_spindles() -> None:
    # 8 cores on SSD: 8 x 2 + 0 = 16; 4 cores, 2 busy disks: 4 x 2 + 2 = 10.
    assert cores_rule(8).connections == 16
    rule = cores_rule(4, spindles=2)
    assert (rule.cores, rule.spindles, rule.connections) == (4, 2, 10)


def test_cores_rule_explains_the_arithmetic_and_that_it_is_server_wide() -> None:
    text = cores_rule(8).explanation
    assert "(8 cores x 2) + 0 effective spindles = 16" in text
    assert "whole server" in text
    assert "not per pool" in text


def test_cores_rule_names_every_bad_input() -> None:
    with pytest.raises(SizingError) as caught:
        cores_rule(0, spindles=-1)
    assert _bad_inputs(caught) == {"cores", "spindles"}
    assert "2 invalid sizing inputs" in str(caught.value)
    assert isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value, ValueError)


def test_cores_rule_refuses_non_integers() -> None:
    with pytest.raises(SizingError) as caught:
        cores_rule(True)
    assert _bad_inputs(caught) == {"cores"}
    with pytest.raises(SizingError):
        cores_rule(2.5)  # type: ignore[arg-type]


# -- Little's law ----------------------------------------------------------------------------


def test_littles_law_worked_example() -> None:
    # 200/s x 0.02 s = 4 busy; 4 / 0.7 = 5.71 -> 6; burst 4 x 1.5 / 0.7 = 8.57 -> 9.
    law = littles_law(200, 0.02)
    assert law.busy == pytest.approx(4.0)
    assert (law.connections, law.peak) == (6, 9)
    assert "200/s x 0.02 s = 4 connections busy" in law.explanation
    assert "4 ÷ 0.7 = 5.714 → 6 connections" in law.explanation
    assert "4 x 1.5 ÷ 0.7 = 8.571 → 9 at peak" in law.explanation


def test_littles_law_is_exact_where_floats_would_round_up() -> None:
    # 100 x 0.07 / 0.7 is 10.000000000000002 in floats; the answer is exactly 10.
    assert 100 * 0.07 / 0.7 > 10
    law = littles_law(100, 0.07)
    assert (law.connections, law.peak) == (10, 15)


def test_littles_law_at_full_utilisation_without_bursts_is_the_busy_count() -> None:
    law = littles_law(50, 0.1, utilisation_target=1.0, burst_factor=1.0)
    assert (law.connections, law.peak) == (5, 5)


def test_littles_law_never_asks_for_less_than_one_connection() -> None:
    law = littles_law(0, 0.05)
    assert (law.busy, law.connections, law.peak) == (0.0, 1, 1)
    assert "at least 1" in law.explanation


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        ((-1, 0.1), "rate_per_s"),
        ((10, 0), "query_time_s"),
        ((10, 0.1, 0.0), "utilisation_target"),
        ((10, 0.1, 1.5), "utilisation_target"),
        ((10, 0.1, 0.7, 0.5), "burst_factor"),
        ((math.nan, 0.1), "rate_per_s"),
        ((10, math.inf), "query_time_s"),
    ],
)
def test_littles_law_names_the_bad_input(args: tuple[float, ...], bad: str) -> None:
    with pytest.raises(SizingError) as caught:
        littles_law(*args)
    assert _bad_inputs(caught) == {bad}


@given(
    rate=st.floats(0, 1e5, allow_nan=False),
    held=st.floats(1e-4, 60, allow_nan=False),
    target=st.floats(0.05, 1.0),
    burst=st.floats(1.0, 10.0),
)
def test_littles_law_covers_the_load_at_the_target_and_no_more(
    rate: float, held: float, target: float, burst: float
) -> None:
    law = littles_law(rate, held, target, burst)
    busy = Fraction(repr(rate)) * Fraction(repr(held))
    t = Fraction(repr(target))
    assert law.connections * t >= busy  # enough at the target
    assert law.connections == 1 or (law.connections - 1) * t < busy  # and the fewest that are
    assert law.peak * t >= busy * Fraction(repr(burst))
    assert law.peak >= law.connections >= 1


# -- per-worker split ------------------------------------------------------------------------


def test_split_shares_the_budget_after_the_reserve() -> None:
    # 97 - 5 = 92 usable; 92 // 4 = 23 each; 2/3 of 23 = 15.3 -> 15 + 8 overflow.
    split = per_worker_split(97, 4)
    assert split.ok
    assert (split.usable, split.per_worker, split.pool_size, split.max_overflow) == (92, 23, 15, 8)
    assert split.total == 92
    assert "97 connections - 5 reserve = 92 usable; ÷ 4 workers = 23 per worker" in (
        split.explanation)


def test_split_reports_connections_left_over() -> None:
    # 30 - 0 = 30; 30 // 4 = 7 each, 2 left; 2/3 of 7 = 4.67 -> 4 + 3.
    split = per_worker_split(30, 4, reserve=0)
    assert (split.per_worker, split.pool_size, split.max_overflow, split.total) == (7, 4, 3, 28)
    assert "2 left unassigned" in split.explanation


def test_split_gives_a_single_connection_when_that_is_all_there_is() -> None:
    split = per_worker_split(6, 1, reserve=5)
    assert split.ok
    assert (split.pool_size, split.max_overflow) == (1, 0)


@pytest.mark.parametrize(("budget", "workers", "reserve"), [(10, 8, 5), (5, 1, 5), (3, 1, 10)])
def test_split_refuses_when_a_worker_would_get_nothing(
    budget: int, workers: int, reserve: int
) -> None:
    split = per_worker_split(budget, workers, reserve)
    assert not split.ok
    assert (split.per_worker, split.pool_size, split.max_overflow, split.total) == (0, 0, 0, 0)
    assert "PgBouncer" in split.explanation
    assert f"fewer than one for each of {workers} workers" in split.explanation


def test_split_names_every_bad_input() -> None:
    with pytest.raises(SizingError) as caught:
        per_worker_split(0, 0, reserve=-1)
    assert _bad_inputs(caught) == {"budget", "workers", "reserve"}


@given(budget=st.integers(1, 10_000), workers=st.integers(1, 500), reserve=st.integers(0, 500))
def test_split_never_exceeds_the_budget(budget: int, workers: int, reserve: int) -> None:
    split = per_worker_split(budget, workers, reserve)
    assert split.ok == (budget - reserve >= workers)
    if split.ok:
        assert split.total <= budget - reserve
        assert split.pool_size >= 1
        assert split.max_overflow >= 0
        assert split.pool_size + split.max_overflow == split.per_worker


# -- server budget ---------------------------------------------------------------------------


def test_server_budget_subtracts_reserved_other_clients_and_headroom() -> None:
    server = ServerBudget(max_connections=100, reserved=3, other_connections=10, headroom=5,
                          processes=4)
    assert (server.budget, server.usable) == (87, 82)


def test_server_budget_names_every_bad_input() -> None:
    with pytest.raises(SizingError) as caught:
        ServerBudget(max_connections=0, reserved=-1, processes=0)
    assert _bad_inputs(caught) == {"max_connections", "reserved", "processes"}
    with pytest.raises(SizingError) as caught:
        ServerBudget(max_connections=10, reserved=3, other_connections=7)
    assert _bad_inputs(caught) == {"max_connections"}
    assert "must exceed reserved + other_connections (3 + 7 = 10)" in str(caught.value)
    assert "(got 10)" in str(caught.value)


def test_budget_problems_names_each_count_it_is_given() -> None:
    assert budget_problems(100, 3, 0) == []
    assert budget_problems(100, 3, 200) == []  # nothing left is not a bad count
    problems = budget_problems(0, -1, -1, processes=0, pool_max_size=-1)
    assert [p.variable for p in problems] == [
        "max_connections", "reserved", "other_connections", "processes", "pool_max_size"]
    assert [p.variable for p in budget_problems(1.5, 0, False)] == [  # type: ignore[arg-type]
        "max_connections", "other_connections"]


def test_service_budget_may_be_negative() -> None:
    assert service_budget(100, 3, 10) == 87
    assert service_budget(10, 3, 20) == -13


@given(
    max_connections=st.integers(1, 10_000),
    reserved=st.integers(0, 100),
    other=st.integers(0, 10_000),
    headroom=st.integers(0, 50),
    processes=st.integers(1, 64),
)
def test_server_budget_is_the_service_budget_or_refuses_it(
    max_connections: int, reserved: int, other: int, headroom: int, processes: int
) -> None:
    counts = {"max_connections": max_connections, "reserved": reserved,
              "other_connections": other, "processes": processes}
    assert budget_problems(max_connections, reserved, other, processes=processes) == []
    budget = service_budget(max_connections, reserved, other)
    assert budget == max_connections - reserved - other
    if budget < 1:
        with pytest.raises(SizingError) as caught:
            ServerBudget(**counts, headroom=headroom)
        assert _bad_inputs(caught) == {"max_connections"}
        return
    server = ServerBudget(**counts, headroom=headroom)
    assert (server.budget, server.usable) == (budget, budget - headroom)


# -- recommend -------------------------------------------------------------------------------


def test_recommend_sizes_each_worker_from_its_share_of_the_load() -> None:
    # 500/s over 4 workers = 125/s each; x 0.02 s = 2.5 busy; / 0.7 = 3.57 -> 4;
    # burst 2.5 x 1.5 / 0.7 = 5.36 -> 6; warm ceil(2.5) = 3. Budget 100 - 3 - 5 = 92 >= 4 x 6.
    rec = recommend(cores=8, workers=4, max_connections=100, rate_per_s=500, query_time_s=0.02)
    assert rec.ok
    assert (rec.pool_size, rec.max_overflow, rec.min_size) == (4, 2, 3)
    assert (rec.max_size, rec.total, rec.usable) == (6, 24, 92)
    assert not rec.server_limited
    assert not rec.budget_limited
    assert rec.load is not None
    assert rec.load.rate_per_s == 125.0
    assert "DB_POOL_SIZE=4, DB_MAX_OVERFLOW=2, DB_POOL_MIN_SIZE=3" in rec.explanation
    assert "4 x 6 = 24 of 92 usable" in rec.explanation


def test_recommend_without_a_load_shares_the_cores_rule() -> None:
    # 4 cores -> 8 active; / 4 workers = 2 each; burst 2 x 1.5 = 3 -> overflow 1.
    rec = recommend(cores=4, workers=4, max_connections=100)
    assert rec.ok
    assert rec.load is None
    assert (rec.pool_size, rec.max_overflow, rec.min_size) == (2, 1, 1)
    assert "8 ÷ 4 → 2" in rec.explanation


def test_recommend_cuts_to_the_budget_and_says_the_server_is_the_bottleneck() -> None:
    # 2000/s x 0.05 s = 100 busy, far above 4 x 2 = 8 active the cores serve.
    # Budget: 30 - 3 - 5 = 22; 22 // 4 = 5 per worker; 4 x 5 x 0.7 / 0.05 = 280/s carried.
    rec = recommend(cores=4, workers=4, max_connections=30, rate_per_s=2000, query_time_s=0.05)
    assert rec.ok
    assert rec.server_limited
    assert rec.budget_limited
    assert (rec.pool_size, rec.max_overflow, rec.min_size) == (5, 0, 5)
    assert rec.total == 20
    assert "the database is the bottleneck" in rec.explanation
    assert "carries about 280/s" in rec.explanation


def test_recommend_refuses_a_budget_that_cannot_give_each_worker_one() -> None:
    # 20 - 3 - 5 = 12 usable for 30 workers.
    rec = recommend(cores=8, workers=30, max_connections=20, rate_per_s=10, query_time_s=0.01)
    assert not rec.ok
    assert (rec.pool_size, rec.max_overflow, rec.min_size, rec.total) == (0, 0, 0, 0)
    assert "PgBouncer" in rec.explanation


def test_recommend_reports_every_bad_input_at_once() -> None:
    with pytest.raises(SizingError) as caught:
        recommend(cores=0, workers=-1, max_connections=100, rate_per_s=math.nan,
                  utilisation_target=2.0)
    assert _bad_inputs(caught) == {"cores", "workers", "rate_per_s", "query_time_s",
                                   "utilisation_target"}


def test_recommend_needs_a_server_with_room_for_this_service() -> None:
    with pytest.raises(SizingError) as caught:
        recommend(cores=4, workers=1, max_connections=10, other_connections=7)
    assert _bad_inputs(caught) == {"max_connections"}


@given(
    cores=st.integers(1, 128),
    workers=st.integers(1, 64),
    max_connections=st.integers(10, 5000),
    other=st.integers(0, 100),
    headroom=st.integers(0, 20),
    load=st.none() | st.tuples(st.floats(0, 1e5), st.floats(1e-4, 10)),
    target=st.floats(0.1, 1.0),
    burst=st.floats(1.0, 5.0),
)
def test_recommend_never_exceeds_the_budget(
    *, cores: int, workers: int, max_connections: int, other: int, headroom: int,
    load: tuple[float, float] | None, target: float, burst: float,
) -> None:
    rate, held = load if load is not None else (None, None)
    if max_connections - 3 - other < 1:
        other = 0
    rec = recommend(cores=cores, workers=workers, max_connections=max_connections,
                    rate_per_s=rate, query_time_s=held, other_connections=other,
                    headroom=headroom, utilisation_target=target, burst_factor=burst)
    usable = max_connections - 3 - other - headroom
    assert rec.usable == usable
    assert rec.ok == (usable >= workers)
    if rec.ok:
        assert rec.total <= usable
        assert rec.pool_size >= 1
        assert 0 <= rec.min_size <= rec.pool_size
        assert rec.max_overflow >= 0
        if rec.load is not None and not rec.budget_limited:
            assert rec.pool_size == rec.load.connections
            assert rec.max_size == rec.load.peak
