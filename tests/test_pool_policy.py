"""Pure policy of the pool core, without a server: backoff, lifetime jitter, configuration
validation and secret masking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolwarden import ConfigurationError, PoolConfig
from poolwarden._secrets import mask_dsn
from poolwarden.pool._policy import Backoff, lifetime_deadline

DSN = "postgresql://app:s3cr%40t@db.internal:5432/app"


@given(
    initial=st.floats(0.001, 1.0),
    max_delay=st.floats(1.0, 60.0),
    failures=st.integers(0, 40),
    draw=st.floats(0.0, 1.0),
)
def test_backoff_delay_is_full_jitter_under_an_exponential_cap(
    initial: float, max_delay: float, failures: int, draw: float
) -> None:
    backoff = Backoff(initial, max_delay, rand=lambda: draw)
    for _ in range(failures):
        backoff.failed()
    delay = backoff.delay()
    if failures == 0:
        assert delay == 0.0
    else:
        cap = min(max_delay, initial * 2.0 ** (failures - 1))
        assert 0.0 <= delay <= cap + 1e-12
        assert delay == pytest.approx(cap * draw)
    backoff.succeeded()
    assert backoff.delay() == 0.0


def test_backoff_cap_doubles_until_max() -> None:
    backoff = Backoff(0.1, 1.0, rand=lambda: 1.0)
    caps = []
    for _ in range(6):
        backoff.failed()
        caps.append(backoff.delay())
    assert caps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


@given(now=st.floats(0, 1e6), lifetime=st.floats(0.01, 1e5), jitter=st.floats(0, 0.99),
       draw=st.floats(0, 1))
def test_lifetime_is_shortened_by_at_most_the_jitter_fraction(
    now: float, lifetime: float, jitter: float, draw: float
) -> None:
    deadline = lifetime_deadline(now, lifetime, jitter, rand=lambda: draw)
    assert now + lifetime * (1 - jitter) - 1e-6 <= deadline <= now + lifetime + 1e-6


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolConfig(dsn=DSN, pool_size=0, max_overflow=-1, min_size=-2, acquire_timeout=0,
                   lifetime_jitter=1.5, max_waiting=-1, statement_timeout=-1)
    variables = {p.variable for p in caught.value.problems}
    assert {"pool_size", "max_overflow", "min_size", "acquire_timeout", "lifetime_jitter",
            "max_waiting", "statement_timeout"} <= variables
    assert "s3cr" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"min_size": 11, "pool_size": 10}, "min_size"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"command_timeout": 0}, "command_timeout"),
        ({"release_timeout": 0}, "release_timeout"),
        ({"max_lifetime": 0}, "max_lifetime"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"ping_after_idle": -0.1}, "ping_after_idle"),
        ({"lock_timeout": -1}, "lock_timeout"),
        ({"idle_in_transaction_timeout": -1}, "idle_in_transaction_timeout"),
        ({"statement_cache_size": -1}, "statement_cache_size"),
        ({"max_concurrent_connects": 0}, "max_concurrent_connects"),
        ({"reconnect_initial_delay": 5, "reconnect_max_delay": 1}, "reconnect_max_delay"),
        ({"maintenance_interval": 0}, "maintenance_interval"),
        ({"dsn": ""}, "dsn"),
        # the wrong type is reported as such, not as a TypeError from a comparison
        ({"command_timeout": None}, "command_timeout"),
        ({"acquire_timeout": "5"}, "acquire_timeout"),
        ({"pool_size": "10"}, "pool_size"),
        ({"min_size": 2.5}, "min_size"),
        ({"max_waiting": True}, "max_waiting"),
        ({"max_lifetime": float("nan")}, "max_lifetime"),
        ({"lifetime_jitter": None}, "lifetime_jitter"),
        ({"leak_threshold": "30"}, "leak_threshold"),
    ],
)
def test_each_config_rule_names_its_field(overrides: dict[str, object], variable: str) -> None:
    options: dict[str, object] = {"dsn": DSN, **overrides}
    with pytest.raises(ConfigurationError) as caught:
        PoolConfig(**options)  # type: ignore[arg-type]
    assert [p.variable for p in caught.value.problems] == [variable]


def test_config_repr_and_str_never_show_the_password() -> None:
    config = PoolConfig(dsn=DSN)
    for text in (repr(config), str(config), config.masked_dsn):
        assert "s3cr" not in text
    assert "db.internal:5432/app" in repr(config)
    assert config.max_size == config.pool_size + config.max_overflow


def test_server_settings_carry_timezone_timeouts_and_application_name() -> None:
    config = PoolConfig(dsn=DSN, statement_timeout=1.5, lock_timeout=2, application_name="svc",
                        server_settings={"search_path": "app"})
    assert config.all_server_settings() == {
        "timezone": "UTC",
        "application_name": "svc",
        "statement_timeout": "1500",
        "lock_timeout": "2000",
        "search_path": "app",
    }


_password = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="@/?#[]"),
    min_size=6, max_size=30,
)


@given(password=_password)
def test_mask_dsn_hides_any_password(password: str) -> None:
    from urllib.parse import quote

    url = f"postgresql://user:{quote(password, safe='')}@host:5432/db"
    masked = mask_dsn(url)
    assert quote(password, safe="") not in masked
    assert masked == "postgresql://user:***@host:5432/db"
    assert mask_dsn(f"host=h password={password} dbname=x").count(password) == 0
