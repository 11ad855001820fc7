"""The zeroloss command: each bad input exits 2 with a message that says what to fix."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zeroloss.cli import main


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["status", "--source", "ftp://x/y"], "unknown source scheme 'ftp'"),
        (["status", "--source", "no-scheme-here"], "is not a URL"),
        (["status", "--source", "spool://"], "names no directory"),
        (["relay", "--source", "sqlite:///x.db", "--target", "amqp2://h"], "unknown target scheme 'amqp2'"),
        (["relay", "--source", "sqlite:///x.db", "--target", "kafka://nohostport"], "is not HOST:PORT"),
        (["demo", "--target", "ftp://h"], "unknown target scheme 'ftp'"),
        (["broker", "--storage", "foo://bar"], "use memory://tansu/"),
    ],
)
def test_bad_urls_exit_2_and_say_what_to_fix(
    args: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = run(*args)
    assert code == 2, out
    assert needle in out


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--backoff-base-s", "-5"], {}, "--backoff-base-s"),
        (["--max-backoff-s", "-1"], {}, "--max-backoff-s"),
        (["--backoff-base-s", "2", "--max-backoff-s", "1"], {}, "below --backoff-base-s"),
        (["--lease-s", "5", "--timeout-s", "30"], {}, "must exceed --timeout-s"),
        ([], {"ZEROLOSS_BACKOFF_BASE_S": "-1"}, "environment variable ZEROLOSS_BACKOFF_BASE_S"),
        ([], {"ZEROLOSS_BATCH_SIZE": "abc"}, "environment variable ZEROLOSS_BATCH_SIZE"),
    ],
    ids=["negative-base", "negative-max", "max-below-base", "lease-below-timeout", "env-base", "env-batch"],
)
def test_relay_timings_that_cannot_work_are_refused_before_anything_starts(
    args: list[str], env: dict[str, str], needle: str, tmp_path: Path
) -> None:
    """A negative backoff is a hot loop; a lease shorter than the publish timeout lets a second
    relay claim a batch that may still be delivered. Nothing is created: no outbox file."""
    db = tmp_path / "never.db"
    result = CliRunner().invoke(
        main, ["relay", "--source", f"sqlite:///{db}", "--target", "kafka://127.0.0.1:1", *args], env=env
    )
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not db.exists()


def test_missing_option_is_a_usage_error() -> None:
    code, out = run("relay", "--source", "sqlite:///x.db")
    assert code == 2
    assert "--target" in out


def test_init_then_status_on_a_fresh_sqlite_outbox(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    assert run("init", "--source", url)[0] == 0
    code, out = run("status", "--source", url, "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["counts"] == {s: 0 for s in ("tmp", "pending", "sending", "success", "failed", "doubt", "malformed")}


def test_status_on_a_spool_shows_disk_space(tmp_path: Path) -> None:
    assert run("init", "--source", f"spool://{tmp_path / 'spool'}")[0] == 0
    code, out = run("status", "--source", f"spool://{tmp_path / 'spool'}")
    assert code == 0, out
    assert "pending" in out and "disk free" in out


@pytest.mark.parametrize(
    "command",
    [["status"], ["relay", "--target", "kafka://127.0.0.1:1", "--drain"], ["failed", "list"]],
    ids=["status", "relay", "failed-list"],
)
def test_only_init_makes_a_spool_and_a_file_is_no_spool(command: list[str], tmp_path: Path) -> None:
    """A typo in a spool path must not become an empty spool that reports 'ok'."""
    where = tmp_path / "no" / "such" / "spool"
    code, out = run(*command, "--source", f"spool://{where}")
    assert code == 2 and "no spool at" in out and "zeroloss init" in out, out
    assert not (tmp_path / "no").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out = run(*command, "--source", f"spool://{a_file}")
    assert code == 2 and "is a file, not a directory" in out and "Traceback" not in out, out


def test_the_init_hint_for_a_missing_table_names_the_table_so_it_fixes_the_error(tmp_path: Path) -> None:
    """`--table orders_outbox` missing: the hint must be `init ... --table orders_outbox`; the bare
    `init --source URL` it gave creates zeroloss_outbox and the same error comes back."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    hint = f"zeroloss init --source {url} --table orders_outbox"
    for command in (["status"], ["failed", "list"], ["doctor"]):
        code, out = run(*command, "--source", url, "--table", "orders_outbox")
        assert code != 0 and hint in out, (command, out)
    assert run("init", "--source", url, "--table", "orders_outbox")[0] == 0  # the hint, followed
    assert run("status", "--source", url, "--table", "orders_outbox")[0] == 0
    code, out = run("status", "--source", url)  # the default table: the hint as before
    assert f"zeroloss init --source {url}\n" in out + "\n" and "--table" not in out, out


@pytest.mark.parametrize(
    "target", ["amqp://guest:guest@127.0.0.1/", "nats://127.0.0.1:4222", "redis://127.0.0.1:6379/0"]
)
def test_audit_of_a_broker_it_cannot_read_back_says_which_it_reads_and_what_to_use(target: str, tmp_path: Path) -> None:
    """The README: audit reads Kafka at recorded offsets, RocketMQ by recorded id. Another broker is
    bad usage (exit 2) naming both and the inbox check, not 'not a Kafka URL' (nothing connects)."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    assert run("init", "--source", url)[0] == 0
    code, out = run("audit", "--source", url, "--target", target)
    assert code == 2, out
    assert "Kafka and RocketMQ only" in out and "--inbox URL --group G" in out, out


def test_init_of_a_spool_it_cannot_make_exits_2_naming_the_directory() -> None:
    """Not a traceback: a path where no directory can be made (under /proc, as a read-only or
    unwritable parent would be for a non-root user) is a configuration error."""
    code, out = run("init", "--source", "spool:///proc/zeroloss-no-spool-here")
    assert code == 2 and "cannot make the spool directory /proc/zeroloss-no-spool-here" in out, out
    assert "Traceback" not in out


def test_status_before_init_tells_to_run_init(tmp_path: Path) -> None:
    code, out = run("status", "--source", f"sqlite:///{tmp_path / 'fresh.db'}")
    assert code != 0
    assert "zeroloss init" in out


def test_a_missing_extra_names_the_extra_to_install(tmp_path: Path) -> None:
    # Hide psycopg from a child interpreter, as on a machine without the [postgres] extra.
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg2'] = None\n"
        "from zeroloss.cli import main\n"
        "main(['status', '--source', 'postgresql://u@127.0.0.1/db'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "zeroloss[postgres]" in proc.stderr


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "zeroloss", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("init", "relay", "status", "broker", "demo", "failed", "doubt", "malformed", "doctor", "audit"):
        assert cmd in proc.stdout


@pytest.mark.postgres
def test_a_relay_the_database_refuses_exits_2_at_start_up_instead_of_retrying_forever() -> None:
    from tests.conftest import require_service

    require_service("postgres")
    result = CliRunner().invoke(
        main,
        [
            "relay",
            "--source",
            "postgresql://nobody@127.0.0.1:5432/test",
            "--target",
            "kafka://127.0.0.1:1",
            "--timeout-s",
            "1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert 'role "nobody" does not exist' in result.output and "waiting will not fix this" in result.output


def test_a_draining_relay_on_an_outbox_without_its_table_exits_2_like_a_running_one(tmp_path: Path) -> None:
    """``relay --drain`` (the tour's form) on a database where ``init`` was not run: the same exit 2
    and hint as ``relay`` without ``--drain``, not exit 1 as if the job had found a problem."""
    sqlite3.connect(tmp_path / "app.db").close()  # the database is there, its outbox table is not
    url = f"sqlite:///{tmp_path / 'app.db'}"
    for drain in ([], ["--drain"]):
        result = CliRunner().invoke(
            main, ["relay", "--source", url, "--target", "kafka://127.0.0.1:1", "--timeout-s", "1", *drain]
        )
        assert result.exit_code == 2, (drain, result.output)
        assert f"create it with: zeroloss init --source {url}" in result.output
        assert "waiting will not fix this" in result.output


def test_a_relay_names_a_missing_table_before_it_waits_for_an_unreachable_broker(tmp_path: Path) -> None:
    """Both wrong: the table is named at once; the broker's connect (30 s by default) is not
    waited out first."""
    sqlite3.connect(tmp_path / "app.db").close()
    url = f"sqlite:///{tmp_path / 'app.db'}"
    proc = subprocess.run(  # a process: its log lines go to its stderr (under pytest, to pytest's capture)
        [
            sys.executable,
            "-m",
            "zeroloss",
            "relay",
            "--source",
            url,
            "--target",
            "kafka://127.0.0.1:1",
            "--timeout-s",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "create it with: zeroloss init" in proc.stderr
    assert "relay started" in proc.stderr and "broker unavailable" not in proc.stderr  # it was not tried


_SHOW = ["show", "0190f0f0-0000-7000-8000-000000000000"]


@pytest.mark.parametrize(
    ("command", "wrong"),
    [
        (_SHOW, "no-table"),
        (["failed", "list"], "no-table"),
        (_SHOW, "no-database"),
        (["failed", "list"], "no-database"),
        (["init"], "no-database"),
    ],
    ids=["show-no-table", "failed-no-table", "show-no-database", "failed-no-database", "init-no-database"],
)
def test_an_outbox_table_or_database_that_is_not_there_exits_2_as_configuration(
    command: list[str], wrong: str, tmp_path: Path
) -> None:
    """A missing outbox table, or a database the server does not have, is configuration: exit 2
    with what to do, as the README's exit codes say (they exited 1, as if the job found a problem)."""
    from tests.conftest import require_service

    if wrong == "no-table":
        sqlite3.connect(tmp_path / "app.db").close()
        url, needle, table = f"sqlite:///{tmp_path / 'app.db'}", "create it with: zeroloss init", "zl_not_made"
    else:
        require_service("postgres")
        url, needle, table = "postgresql://postgres@127.0.0.1:5432/zl_no_such_db", "refused us", "zeroloss_outbox"
    code, out = run(*command, "--source", url, "--table", table)
    assert code == 2, out
    assert needle in out


@pytest.mark.parametrize(
    "command",
    [["status"], _SHOW, ["failed", "list"], ["audit"], ["relay", "--target", "kafka://127.0.0.1:1", "--drain"]],
    ids=["status", "show", "failed-list", "audit", "relay-drain"],
)
def test_a_sqlite_path_that_does_not_exist_exits_2_and_is_not_created(command: list[str], tmp_path: Path) -> None:
    """A mistyped SQLite path: exit 2 naming the path and the init command; no empty database is
    left behind (sqlite3 makes the file on connect: status then blamed a missing table)."""
    db = tmp_path / "typo.db"
    code, out = run(*command, "--source", f"sqlite:///{db}", "--table", "orders_outbox")
    assert code == 2, out
    assert f"no SQLite database at {db}" in out
    assert f"create it with: zeroloss init --source sqlite:///{db} --table orders_outbox" in out
    assert not db.exists()


@pytest.mark.postgres
def test_the_init_hint_says_where_the_masked_password_goes() -> None:
    """The hint's URL masks the password (it is not printed), so pasted as is it would not log in:
    the hint says so."""
    from tests.conftest import require_service

    require_service("postgres")  # trust auth: the password is not checked, the table is missing
    code, out = run("status", "--source", "postgresql://postgres:s3cret@127.0.0.1:5432/test", "--table", "zl_nope")
    assert code == 2, out
    assert "zeroloss init --source postgresql://postgres:***@127.0.0.1:5432/test --table zl_nope" in out
    assert "your password in place of ***" in out and "s3cret" not in out


def test_init_still_creates_a_sqlite_database(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    code, out = run("init", "--source", f"sqlite:///{db}")
    assert code == 0, out
    assert db.exists()


def _crashed_spool(root: Path, txids: list[str]) -> dict[str, str]:
    """A spool whose app died inside each transaction's block: tmp files, made old. id → txid."""
    import os

    from zeroloss.outbox.spool import FileSpool

    spool = FileSpool(root, create=True)
    ids = {}
    for txid in txids:
        tx = spool.transaction(txid).__enter__()
        ids[tx.add(topic=f"resolved-{os.getpid()}", value=txid.encode(), key=b"k")] = txid
    spool.close()
    for name in os.listdir(root / "tmp"):
        os.utime(root / "tmp" / name, (1, 1))  # older than any tmp grace
    return ids


def _states(root: Path) -> dict[str, str]:
    """txid → the spool directory its message is in now (absent: discarded)."""
    import os

    from zeroloss.message import decode

    out = {}
    for state in ("tmp", "pending", "sending", "success", "failed", "doubt"):
        for name in os.listdir(root / state):
            out[decode((root / state / name).read_bytes()).value.decode()] = state
    return out


@pytest.mark.parametrize("how", ["sql", "command"])
def test_relay_settles_a_crashed_spool_with_a_resolver(how: str, tmp_path: Path, kafka: object) -> None:
    """tx-commit is sent, tx-rollback discarded, tx-unknown goes to doubt/ (command: prints unknown),
    and tx-broken (the resolver crashed: exit 1, never read as an answer) stays in tmp/."""
    import sqlite3

    root = tmp_path / "spool"
    _crashed_spool(root, ["tx-commit", "tx-rollback", "tx-unknown", "tx-broken"])
    app_db = tmp_path / "app.db"
    with sqlite3.connect(app_db) as db:
        db.execute("CREATE TABLE spool_txids (txid TEXT PRIMARY KEY)")
        db.execute("INSERT INTO spool_txids VALUES ('tx-commit')")
    if how == "sql":  # a row or none: committed or rolled back, nothing in between
        opts = [
            "--resolver-sql",
            "SELECT 1 FROM spool_txids WHERE txid = :txid",
            "--resolver-db",
            f"sqlite:///{app_db}",
        ]
        expected = {"tx-commit": "success"}
    else:
        script = tmp_path / "resolve.py"
        script.write_text(
            "import sqlite3, sys\n"
            "txid = sys.argv[1]\n"
            "if txid == 'tx-broken': raise ConnectionError('cannot reach the database')  # exit 1, a traceback\n"
            "if txid == 'tx-unknown': print('unknown'); sys.exit(0)\n"
            f"row = sqlite3.connect({str(app_db)!r}).execute('SELECT 1 FROM spool_txids WHERE txid = ?', (txid,))\n"
            "print('committed' if row.fetchone() else 'rolled-back')\n"
        )
        opts = ["--resolver-command", f"{sys.executable} {script}"]
        expected = {"tx-commit": "success", "tx-unknown": "doubt", "tx-broken": "tmp"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zeroloss",
            "relay",
            "--source",
            f"spool://{root}",
            "--target",
            kafka.url,  # type: ignore[attr-defined]
            "--drain",
            *opts,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert _states(root) == expected, proc.stderr
    if how == "command":
        assert "transaction tx-broken: the resolver failed" in proc.stderr
        assert "cannot reach the database" in proc.stderr


@pytest.mark.parametrize(
    ("source", "opts", "needle"),
    [
        ("sqlite:///x.db", ["--resolver-command", "true"], "are for a spool source"),
        ("spool", ["--resolver-sql", "SELECT 1 WHERE :txid"], "go together"),
        ("spool", ["--resolver-sql", "SELECT 1", "--resolver-db", "sqlite:///app.db"], "parameter :txid"),
        ("spool", ["--resolver-command", "no-such-resolver-cmd"], "not an executable on PATH"),
        ("spool", ["--resolver-command", "true", "--resolver-db", "sqlite:///a.db"], "not both"),
    ],
    ids=["sql-source", "sql-without-db", "no-txid", "no-command", "both"],
)
def test_resolver_options_that_cannot_work_exit_2(
    source: str, opts: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if source == "spool":
        assert run("init", "--source", f"spool://{tmp_path / 's'}")[0] == 0
        source = f"spool://{tmp_path / 's'}"
    code, out = run("relay", "--source", source, "--target", "kafka://127.0.0.1:1", "--drain", *opts)
    assert code == 2, out
    assert needle in out


def test_tmp_grace_keeps_a_running_transaction_from_its_resolver(tmp_path: Path, kafka: object) -> None:
    """A transaction running longer than the default grace (60 s) must not be asked about: its
    "no row" would read as rolled back and its messages be discarded. --tmp-grace-s covers it."""
    import os
    import time

    root = tmp_path / "spool"
    _crashed_spool(root, ["tx-long"])
    for name in os.listdir(root / "tmp"):
        os.utime(root / "tmp" / name, (time.time() - 120, time.time() - 120))  # two minutes in
    script = tmp_path / "resolve.py"
    script.write_text("print('rolled-back')\n")  # what a resolver says of a transaction still open
    base = [
        sys.executable,
        "-m",
        "zeroloss",
        "relay",
        "--source",
        f"spool://{root}",
        "--target",
        kafka.url,  # type: ignore[attr-defined]
        "--drain",
        "--resolver-command",
        f"{sys.executable} {script}",
    ]
    kept = subprocess.run([*base, "--tmp-grace-s", "600"], capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stderr
    assert _states(root) == {"tx-long": "tmp"}
    gone = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert gone.returncode == 0, gone.stderr
    assert _states(root) == {}  # with the default 60 s it was asked, and discarded
    assert "rolled back; tmp file discarded" in gone.stderr


@pytest.mark.parametrize(("opts", "batch"), [([], 2000), (["--batch-size", "700"], 700)], ids=["default", "given"])
def test_a_relay_to_kafka_batches_2000_unless_told(opts: list[str], batch: int, tmp_path: Path, kafka: object) -> None:
    """Kafka: one transaction per batch, so a bigger default (500 for the other brokers:
    tests/test_cli_output.py); --batch-size still wins."""
    source = f"sqlite:///{tmp_path / 'outbox.db'}"
    assert run("init", "--source", source)[0] == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zeroloss",
            "relay",
            "--source",
            source,
            "--target",
            kafka.url,  # type: ignore[attr-defined]
            "--drain",
            *opts,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = next(line for line in proc.stderr.splitlines() if "relay started" in line)
    assert f"(batch {batch}," in start, start
