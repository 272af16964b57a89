"""DatabaseSettings: parsing, every rule, presets, masking and conversion (pure, no server)."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import subprocess
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from poolwarden.errors import ConfigurationError
from poolwarden.pool.config import PoolConfig, ResetPolicy
from poolwarden.settings import PRESETS, DatabaseSettings, normalise_url, parse_duration

URL = "postgresql://app:secret@db.example:5432/app"
RAW_PASSWORD = "p@ss:w/rd%"
ENCODED_PASSWORD = quote(RAW_PASSWORD, safe="")


def load(**env: str) -> DatabaseSettings:
    """Settings from exactly ``env`` (DATABASE_URL defaulted), never the process environment."""
    return DatabaseSettings.from_env({"DATABASE_URL": URL, **env})


def problems(env: dict[str, str], **overrides: object) -> dict[str, str]:
    """variable -> rule of every problem reported for ``env``."""
    with pytest.raises(ConfigurationError) as info:
        DatabaseSettings.from_env(env, **overrides)
    return {p.variable: p.rule for p in info.value.problems}


def problem_of(**env: str) -> str:
    """The single problem's rule for ``env`` (with a valid DATABASE_URL)."""
    found = problems({"DATABASE_URL": URL, **env})
    assert len(found) == 1, found
    return next(iter(found.values()))


# -- defaults, sources, presets ---------------------------------------------------------------


def test_defaults_are_pool_config_defaults() -> None:
    built = load().pool_config()
    reference = PoolConfig(dsn=URL)
    for field in dataclasses.fields(PoolConfig):
        if field.name not in ("dsn", "init", "server_settings"):
            assert getattr(built, field.name) == getattr(reference, field.name), field.name


def test_sources_say_where_each_value_came_from() -> None:
    s = DatabaseSettings.from_env(
        {"DATABASE_URL": URL, "DB_PRESET": "high_traffic", "DB_POOL_SIZE": "40"},
        max_overflow=3,
    )
    sources = s.sources()
    assert sources["DATABASE_URL"] == "env"
    assert sources["DB_POOL_SIZE"] == "env"
    assert sources["DB_MAX_OVERFLOW"] == "argument"
    assert sources["DB_POOL_TIMEOUT"] == "preset"
    assert sources["DB_POOL_RECYCLE"] == "default"
    assert (s.pool_size, s.max_overflow, s.pool_timeout) == (40, 3, 1.0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_valid_and_applied(preset: str) -> None:
    s = load(DB_PRESET=preset)
    for name, value in PRESETS[preset].items():
        assert getattr(s, name) == value
    config = s.pool_config()
    assert config.pool_size == PRESETS[preset]["pool_size"]


def test_presets_have_the_promised_character() -> None:
    dev, api = load(DB_PRESET="development"), load(DB_PRESET="small_api")
    high, worker = load(DB_PRESET="high_traffic"), load(DB_PRESET="background_worker")
    assert dev.echo
    assert dev.pool_size <= 5
    assert high.pool_size > api.pool_size
    assert high.pool_timeout < api.pool_timeout
    assert high.pool_max_waiting < load().pool_max_waiting
    assert worker.pool_size <= 2
    assert worker.statement_timeout is not None
    assert worker.statement_timeout >= 600


def test_preset_name_spelling_is_forgiving() -> None:
    assert load(DB_PRESET="Small-API").preset == "small_api"


def test_environment_overrides_preset_and_arguments_override_environment() -> None:
    env = {"DATABASE_URL": URL, "DB_PRESET": "development", "DB_ECHO": "false",
           "DB_POOL_SIZE": "7"}
    s = DatabaseSettings.from_env(env, pool_size=9)
    assert s.echo is False
    assert s.pool_size == 9


def test_explicit_value_contradicting_a_preset_is_reported_with_the_preset_named() -> None:
    rule = problem_of(DB_PRESET="development", DB_POOL_MIN_SIZE="8")
    assert "DB_POOL_SIZE (5, preset development)" in rule


def test_describe_lists_every_variable_with_source() -> None:
    rows = load(DB_POOL_SIZE="3").describe()
    table = {var: (value, source) for var, value, source in rows}
    assert table["DB_POOL_SIZE"] == ("3", "env")
    assert table["DB_STATEMENT_TIMEOUT"] == ("unset", "default")
    assert "DB_SSL_MODE" in table
    assert len(rows) == len(DatabaseSettings.model_fields)


# -- reading the environment ------------------------------------------------------------------


def test_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("DB_POOL_SIZE", "12")
    assert DatabaseSettings().pool_size == 12
    assert DatabaseSettings.from_env().pool_size == 12


def test_from_env_with_a_mapping_ignores_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DB_POOL_SIZE", "abc")
    monkeypatch.setenv("DB_POOL_SIZ", "1")
    assert load().pool_size == 10


def test_empty_variable_counts_as_unset() -> None:
    assert load(DB_POOL_SIZE="", DB_SSL_MODE="").pool_size == 10


def test_variable_names_are_case_insensitive() -> None:
    assert DatabaseSettings.from_env({"database_url": URL, "db_pool_size": "4"}).pool_size == 4


def test_settings_are_sealed() -> None:
    s = load()
    with pytest.raises(ValidationError):
        s.pool_size = 3


# -- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 5.0), ("0.5", 0.5), (".25", 0.25), ("500ms", 0.5), ("5s", 5.0), ("2m", 120.0),
     ("1h", 3600.0), (" 3 S ", 3.0), ("0", 0.0), (7, 7.0), (1.5, 1.5),
     (timedelta(minutes=1), 60.0)],
)
def test_parse_duration_accepts_seconds_and_units(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "5x", "5 sec", "inf", "nan", "", "1e3", True, None])
def test_parse_duration_rejects_non_durations(text: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is the caller's concern
        parse_duration(text)


def test_duration_variables_accept_units() -> None:
    s = load(DB_POOL_TIMEOUT="500ms", DB_POOL_RECYCLE="30m", DB_STATEMENT_TIMEOUT="2s")
    assert (s.pool_timeout, s.pool_recycle, s.statement_timeout) == (0.5, 1800.0, 2.0)


@given(st.floats(min_value=0.001, max_value=1e6, allow_nan=False))
def test_any_plain_number_round_trips_as_seconds(seconds: float) -> None:
    assert parse_duration(repr(seconds)) == seconds


# -- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme",
    ["postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg", "POSTGRESQL"],
)
def test_url_schemes_are_normalised_for_asyncpg(scheme: str) -> None:
    s = DatabaseSettings.from_env({"DATABASE_URL": f"{scheme}://u:pw@h:5432/db?sslmode=require"})
    assert s.dsn == "postgresql://u:pw@h:5432/db?sslmode=require"
    assert s.masked_url == "postgresql://u:***@h:5432/db?sslmode=require"


@pytest.mark.parametrize(
    ("url", "rule"),
    [("mysql://u:pw@h/db", "must start with one of"),
     ("h:5432/db", "must be a URL like"),
     ("postgresql://u:pw@h:notaport/db", "percent-encode"),
     (f"postgresql://u:{RAW_PASSWORD}@h/db", "percent-encode"),
     ("postgresql://u:12/ab@h/db", "percent-encode"),
     ("postgresql://u:a#b@h/db", "percent-encode")],
)
def test_bad_urls_are_rejected_with_the_rule(url: str, rule: str) -> None:
    found = problems({"DATABASE_URL": url})
    assert list(found) == ["DATABASE_URL"]
    assert rule in found["DATABASE_URL"]


def test_missing_url_is_required() -> None:
    assert "is required" in problems({})["DATABASE_URL"]


def test_multi_host_url_is_accepted() -> None:
    assert normalise_url("postgres://u@h1:5432,h2:5433/db") == "postgresql://u@h1:5432,h2:5433/db"


def test_sqlalchemy_urls() -> None:
    s = load()
    assert s.sqlalchemy_url() == "postgresql+asyncpg://app:secret@db.example:5432/app"
    assert s.sqlalchemy_url("psycopg") == (
        "postgresql+psycopg://app:secret@db.example:5432/app?application_name=poolwarden"
    )
    with pytest.raises(ValueError, match="driver"):
        s.sqlalchemy_url("psycopg2")  # type: ignore[arg-type]


def test_sqlalchemy_psycopg_url_carries_ssl_but_keeps_url_parameters() -> None:
    s = DatabaseSettings.from_env(
        {"DATABASE_URL": URL + "?application_name=mine", "DB_SSL_MODE": "require"}
    )
    url = s.sqlalchemy_url("psycopg")
    assert url.endswith("?application_name=mine&sslmode=require")


def test_replica_urls_are_split_normalised_and_masked() -> None:
    s = load(DATABASE_REPLICA_URLS="postgres://u:r1@r1/db, postgresql+asyncpg://u:r2@a,b:5433/db")
    assert [u.get_secret_value() for u in s.replica_urls] == [
        "postgresql://u:r1@r1/db", "postgresql://u:r2@a,b:5433/db"]
    assert s.masked_replica_urls == ("postgresql://u:***@r1/db", "postgresql://u:***@a,b:5433/db")
    assert load(DATABASE_REPLICA_URLS="").replica_urls == ()


def test_bad_replica_entries_are_named() -> None:
    rule = problem_of(DATABASE_REPLICA_URLS="postgresql://u@r1/db,mysql://u:x@r2/db")
    assert rule.startswith("entry 2 must start with")


def test_replica_must_not_be_the_primary_or_repeat() -> None:
    assert "primary" in problem_of(DATABASE_REPLICA_URLS=URL)
    assert "repeat" in problem_of(DATABASE_REPLICA_URLS="postgres://r/db,postgresql://r/db")


# -- one rule per variable --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "rule"),
    [("DB_POOL_SIZE", "abc", "must be an integer >= 1"),
     ("DB_POOL_SIZE", "0", "must be an integer >= 1"),
     ("DB_POOL_SIZE", "2.5", "must be an integer >= 1"),
     ("DB_MAX_OVERFLOW", "-1", "must be an integer >= 0"),
     ("DB_POOL_MIN_SIZE", "-1", "must be an integer >= 0"),
     ("DB_POOL_MAX_WAITING", "-1", "must be an integer >= 0"),
     ("DB_STATEMENT_CACHE_SIZE", "x", "must be an integer >= 0"),
     ("DB_POOL_TIMEOUT", "0", "must be a duration > 0"),
     ("DB_POOL_TIMEOUT", "-5", "must be a duration > 0"),
     ("DB_POOL_RECYCLE", "-1", "must be a duration > 0"),
     ("DB_POOL_IDLE_TIMEOUT", "soon", "must be a duration > 0"),
     ("DB_POOL_PING_AFTER_IDLE", "-1", "must be a duration >= 0"),
     ("DB_SLOW_QUERY_THRESHOLD", "0", "must be a duration > 0"),
     ("DB_STATEMENT_TIMEOUT", "-1", "must be a duration >= 0"),
     ("DB_LOCK_TIMEOUT", "1 week", "must be a duration >= 0"),
     ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "inf", "must be a duration >= 0"),
     ("DB_CONNECT_TIMEOUT", "0", "must be a duration > 0"),
     ("DB_COMMAND_TIMEOUT", "nan", "must be a duration > 0"),
     ("DB_POOL_PRE_PING", "maybe", "must be a boolean"),
     ("DB_ECHO", "2", "must be a boolean"),
     ("DB_ECHO_POOL", "sure", "must be a boolean"),
     ("DB_POOL_RESET", "never", "must be one of: transaction, always"),
     ("DB_PRESET", "huge", "must be one of: development, small_api"),
     ("DB_SSL_MODE", "strict", "must be one of: disable, allow, prefer"),
     ("DB_SSL_CA", "/no/such/ca.pem", "existing, readable file"),
     ("DB_SSL_CERT", "/no/such/cert.pem", "existing, readable file"),
     ("DB_SSL_KEY", "/no/such/key.pem", "existing, readable file"),
     ("DB_APPLICATION_NAME", "x" * 64, "1 to 63 printable ASCII"),
     ("DB_APPLICATION_NAME", "caf\u00e9", "1 to 63 printable ASCII")],
)
def test_each_invalid_value_names_its_variable_and_rule(
    variable: str, value: str, rule: str
) -> None:
    found = problems({"DATABASE_URL": URL, variable: value})
    assert variable in found, found
    assert rule in found[variable]


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("off", False), ("1", True)])
def test_booleans_accept_common_spellings(value: str, expected: bool) -> None:
    s = load(DB_ECHO=value, DB_ECHO_POOL=value, DB_POOL_PRE_PING=value)
    assert s.echo is s.echo_pool is s.pool_pre_ping is expected


def test_problem_carries_the_value_given() -> None:
    with pytest.raises(ConfigurationError) as info:
        load(DB_POOL_SIZE="abc")
    (problem,) = info.value.problems
    assert (problem.variable, problem.value) == ("DB_POOL_SIZE", "'abc'")
    assert "DB_POOL_SIZE: must be an integer >= 1 (got 'abc')" in str(info.value)


# -- cross-field rules ------------------------------------------------------------------------


def test_min_size_above_pool_size() -> None:
    assert problem_of(DB_POOL_SIZE="4", DB_POOL_MIN_SIZE="5").startswith("must be <= DB_POOL_SIZE")
    assert load(DB_POOL_SIZE="4", DB_POOL_MIN_SIZE="4").pool_min_size == 4


def test_statement_timeout_must_be_below_command_timeout() -> None:
    rule = problem_of(DB_STATEMENT_TIMEOUT="30", DB_COMMAND_TIMEOUT="30")
    assert "must be < DB_COMMAND_TIMEOUT" in rule
    assert "must be < DB_COMMAND_TIMEOUT (30.0, default)" in problem_of(DB_STATEMENT_TIMEOUT="1m")
    assert load(DB_STATEMENT_TIMEOUT="0").statement_timeout == 0  # 0 disables it on the server


def test_lock_timeout_must_be_below_statement_timeout() -> None:
    assert "never fire" in problem_of(DB_STATEMENT_TIMEOUT="5", DB_LOCK_TIMEOUT="5")


def test_lock_timeout_without_statement_timeout_must_be_below_command_timeout() -> None:
    assert "DB_COMMAND_TIMEOUT" in problem_of(DB_LOCK_TIMEOUT="40")


def test_slow_query_threshold_must_be_below_command_timeout() -> None:
    assert "is ever reported as slow" in problem_of(DB_SLOW_QUERY_THRESHOLD="30")


def test_ping_after_idle_without_pre_ping_is_contradictory() -> None:
    assert "no effect" in problem_of(DB_POOL_PRE_PING="false", DB_POOL_PING_AFTER_IDLE="1")
    assert load(DB_POOL_PRE_PING="false").pool_config().pre_ping is False


def test_a_value_that_failed_to_parse_triggers_no_spurious_cross_field_problem() -> None:
    found = problems({"DATABASE_URL": URL, "DB_POOL_SIZE": "abc", "DB_POOL_MIN_SIZE": "20"})
    assert list(found) == ["DB_POOL_SIZE"]


def test_every_problem_is_reported_at_once() -> None:
    env = {
        "DATABASE_URL": f"mysql://u:{ENCODED_PASSWORD}@h/db",
        "DB_POOL_SIZE": "abc", "DB_MAX_OVERFLOW": "-1", "DB_POOL_TIMEOUT": "-5",
        "DB_PRESET": "huge", "DB_SSL_MODE": "bogus", "DB_SSL_CA": "/no/such/file",
        "DB_STATEMENT_TIMEOUT": "60", "DB_POOL_SIZ": "3", "DB_HOST": "ignored",
    }
    with pytest.raises(ConfigurationError) as info:
        DatabaseSettings.from_env(env, nonsense=1)
    found = {p.variable for p in info.value.problems}
    assert found == {
        "DATABASE_URL", "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_TIMEOUT", "DB_PRESET",
        "DB_SSL_MODE", "DB_SSL_CA", "DB_STATEMENT_TIMEOUT", "DB_POOL_SIZ", "nonsense",
    }
    # the pydantic error (which echoes the input) is neither chained nor the context
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_typo_in_a_variable_name_is_reported() -> None:
    assert "did you mean DB_POOL_SIZE" in problem_of(DB_POOL_SIZ="3")
    assert "did you mean DATABASE_REPLICA_URLS" in problem_of(DATABASE_REPLICA_URL="x")
    assert "is not a known setting" in problem_of(DB_POOL_WHATEVER="3")
    assert load(DB_HOST="h", DB_PASSWORD="pw", DATABASE_MIGRATIONS="on").pool_size == 10


# -- SSL --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "client.crt", root / "client.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=client"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def ca_file(client_cert: tuple[Path, Path]) -> Path:
    return client_cert[0]  # a self-signed certificate is a valid CA file


def test_ssl_mode_string_is_passed_through() -> None:
    assert load(DB_SSL_MODE="require").pool_config().ssl == "require"
    assert load().pool_config().ssl is None


@pytest.mark.parametrize(("mode", "hostname"), [("verify-full", True), ("verify-ca", False)])
def test_ssl_context_is_built_for_verifying_modes(ca_file: Path, mode: str, hostname: bool) -> None:
    context = load(DB_SSL_MODE=mode, DB_SSL_CA=str(ca_file)).pool_config().ssl
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is hostname


def test_client_certificate_is_loaded(client_cert: tuple[Path, Path]) -> None:
    cert, key = client_cert
    context = load(DB_SSL_MODE="require", DB_SSL_CERT=str(cert), DB_SSL_KEY=str(key)).pool_config()
    assert isinstance(context.ssl, ssl.SSLContext)
    assert context.ssl.verify_mode == ssl.CERT_NONE


def test_cert_and_key_must_be_given_together(client_cert: tuple[Path, Path]) -> None:
    cert, key = client_cert
    assert "together with DB_SSL_CERT" in problems(
        {"DATABASE_URL": URL, "DB_SSL_MODE": "require", "DB_SSL_CERT": str(cert)})["DB_SSL_KEY"]
    assert "together with DB_SSL_KEY" in problems(
        {"DATABASE_URL": URL, "DB_SSL_MODE": "require", "DB_SSL_KEY": str(key)})["DB_SSL_CERT"]


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_verifying_modes_need_a_ca(mode: str) -> None:
    assert "is required" in problem_of(DB_SSL_MODE=mode)


def test_sslrootcert_in_the_url_satisfies_the_ca_requirement() -> None:
    s = DatabaseSettings.from_env(
        {"DATABASE_URL": URL + "?sslrootcert=/etc/ca.pem", "DB_SSL_MODE": "verify-full"})
    assert s.pool_config().ssl == "verify-full"


@pytest.mark.parametrize("mode", [None, "disable", "allow", "prefer"])
def test_ssl_files_need_an_enforcing_mode(ca_file: Path, mode: str | None) -> None:
    env = {"DATABASE_URL": URL, "DB_SSL_CA": str(ca_file)}
    if mode is not None:
        env["DB_SSL_MODE"] = mode
    assert "must be require, verify-ca or verify-full" in problems(env)["DB_SSL_MODE"]


def test_ssl_mode_conflicting_with_the_url_is_reported() -> None:
    found = problems({"DATABASE_URL": URL + "?sslmode=disable", "DB_SSL_MODE": "require"})
    assert "conflicts with sslmode=disable" in found["DB_SSL_MODE"]


def test_unloadable_ssl_files_are_reported(tmp_path: Path, client_cert: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    assert "could not be loaded" in problem_of(DB_SSL_MODE="verify-full", DB_SSL_CA=str(junk))
    cert, _ = client_cert
    found = problems({"DATABASE_URL": URL, "DB_SSL_MODE": "require", "DB_SSL_CERT": str(cert),
                      "DB_SSL_KEY": str(junk)})
    assert "could not be loaded" in found["DB_SSL_CERT"]


# -- secrets ----------------------------------------------------------------------------------


def _everything_printed(s: DatabaseSettings) -> str:
    return "\n".join([repr(s), str(s), repr(s.model_dump()), s.model_dump_json(), s.masked_url,
                      repr(s.describe()), repr(s.pool_config()), repr(s.masked_replica_urls)])


def test_password_with_special_characters_is_never_printed() -> None:
    url = f"postgresql://app:{ENCODED_PASSWORD}@h:5432/db"
    s = DatabaseSettings.from_env({"DATABASE_URL": url, "DATABASE_REPLICA_URLS": url + "2"})
    printed = _everything_printed(s)
    assert RAW_PASSWORD not in printed
    assert ENCODED_PASSWORD not in printed
    assert s.masked_url == "postgresql://app:***@h:5432/db"


def test_password_is_masked_in_errors_even_when_unencoded() -> None:
    env = {"DATABASE_URL": f"postgresql://app:{RAW_PASSWORD}@h/db",
           "DATABASE_REPLICA_URLS": f"mysql://app:{RAW_PASSWORD}@r/db", "DB_POOL_SIZE": "0"}
    with pytest.raises(ConfigurationError) as info:
        DatabaseSettings.from_env(env)
    text = str(info.value) + repr(info.value.problems)
    assert RAW_PASSWORD not in text
    assert "w/rd" not in text
    assert {p.variable for p in info.value.problems} == {
        "DATABASE_URL", "DATABASE_REPLICA_URLS", "DB_POOL_SIZE"}


def test_password_is_masked_in_cross_field_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        load(DATABASE_REPLICA_URLS=URL)
    assert "secret" not in str(info.value)


def test_password_given_as_argument_is_masked_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        DatabaseSettings.from_env({}, database_url="mysql://u:secret@h/db")
    assert "secret" not in str(info.value)
    assert "***" in str(info.value)


@settings(max_examples=75, deadline=None)
@given(st.text(min_size=4, max_size=24).filter(lambda p: p.strip() == p))
def test_no_random_password_ever_appears(password: str) -> None:
    url = f"postgresql://user:{quote(password, safe='')}@host:5432/db"
    s = DatabaseSettings.from_env({"DATABASE_URL": url})
    assert s.dsn == url
    printed = _everything_printed(s)
    assert f":{password}@" not in printed
    assert f":{quote(password, safe='')}@" not in printed


# -- pool_config mapping ----------------------------------------------------------------------


def test_pool_config_maps_every_setting() -> None:
    s = DatabaseSettings.from_env({
        "DATABASE_URL": "postgres://u:pw@h/db", "DB_POOL_SIZE": "8", "DB_MAX_OVERFLOW": "2",
        "DB_POOL_MIN_SIZE": "3", "DB_POOL_MAX_WAITING": "50", "DB_POOL_TIMEOUT": "2.5",
        "DB_POOL_RECYCLE": "10m", "DB_POOL_IDLE_TIMEOUT": "90", "DB_POOL_PRE_PING": "false",
        "DB_POOL_RESET": "ALWAYS", "DB_STATEMENT_TIMEOUT": "20", "DB_LOCK_TIMEOUT": "3",
        "DB_IDLE_IN_TRANSACTION_TIMEOUT": "60", "DB_CONNECT_TIMEOUT": "4",
        "DB_COMMAND_TIMEOUT": "25", "DB_APPLICATION_NAME": "billing",
        "DB_STATEMENT_CACHE_SIZE": "0", "DB_SSL_MODE": "prefer",
    })
    c = s.pool_config(name="replica-1")
    assert (c.dsn, c.name) == ("postgresql://u:pw@h/db", "replica-1")
    assert (c.pool_size, c.max_overflow, c.min_size, c.max_waiting, c.max_size) == (8, 2, 3, 50, 10)
    assert (c.acquire_timeout, c.max_lifetime, c.idle_timeout) == (2.5, 600.0, 90.0)
    assert c.pre_ping is False
    assert c.reset is ResetPolicy.ALWAYS
    assert (c.statement_timeout, c.lock_timeout, c.idle_in_transaction_timeout) == (20, 3, 60)
    assert (c.connect_timeout, c.command_timeout) == (4.0, 25.0)
    assert (c.application_name, c.statement_cache_size, c.ssl) == ("billing", 0, "prefer")


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 500), overflow=st.integers(0, 500), data=st.data())
def test_any_valid_sizes_give_a_pool_of_size_plus_overflow(
    size: int, overflow: int, data: st.DataObject
) -> None:
    min_size = data.draw(st.integers(0, size))
    s = load(DB_POOL_SIZE=str(size), DB_MAX_OVERFLOW=str(overflow), DB_POOL_MIN_SIZE=str(min_size))
    c = s.pool_config()
    assert (c.max_size, c.min_size) == (size + overflow, min_size)


@settings(max_examples=100, deadline=None)
@given(size=st.integers(-5, 20), overflow=st.integers(-5, 20), min_size=st.integers(-5, 25))
def test_invalid_size_combinations_are_never_clamped(
    size: int, overflow: int, min_size: int
) -> None:
    env = {"DB_POOL_SIZE": str(size), "DB_MAX_OVERFLOW": str(overflow),
           "DB_POOL_MIN_SIZE": str(min_size)}
    valid = size >= 1 and overflow >= 0 and 0 <= min_size <= size
    if valid:
        assert load(**env).pool_config().max_size == size + overflow
    else:
        with pytest.raises(ConfigurationError):
            load(**env)
