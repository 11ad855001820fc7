"""``--help`` says what the README says: every option has a help line and shows its environment
variable, durations end in ``-s`` (old spellings still work, hidden), ``dlq`` takes ``--topic``
and offers only the brokers it reads, spool-only commands name spool URLs only, and list rows stay
one line each."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.conftest import REDIS_URL, require_service, unique_topic
from zeroloss.cli import main
from zeroloss.outbox.spool import FileSpool
from zeroloss.outbox.sql import SqlOutbox


def _commands(cmd: click.Command, path: tuple[str, ...] = ("zeroloss",)) -> Iterator[tuple[str, click.Command]]:
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))


def _visible_options(cmd: click.Command) -> Iterator[click.Option]:
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden and p.name not in ("help", "version"):
            yield p


def _help_line(name: str, cmd: click.Command, opt: click.Option) -> str:
    """The option's line as ``name --help`` prints it (one context per level, as click makes them)."""
    ctx: click.Context | None = None
    for part in name.split(" "):
        ctx = click.Context(
            cmd if part == name.split(" ")[-1] else main,
            info_name=part,
            parent=ctx,
            auto_envvar_prefix="ZEROLOSS" if ctx is None else None,
        )
    assert ctx is not None
    record = opt.get_help_record(ctx)
    assert record is not None, (name, opt.opts)
    return record[1]


def test_every_option_has_a_help_line_and_shows_its_environment_variable() -> None:
    missing = []
    seen = 0
    for name, cmd in _commands(main):
        for opt in _visible_options(cmd):
            seen += 1
            line = _help_line(name, cmd, opt)
            if not opt.help or not opt.help.strip():
                missing.append(f"{name} {opt.opts[0]}: no help")
            if "env var: ZEROLOSS_" not in line:
                missing.append(f"{name} {opt.opts[0]}: no environment variable shown ({line!r})")
    assert seen > 80  # the walk found the commands
    assert missing == [], "\n".join(missing)


def test_the_environment_variable_shown_is_the_one_read(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool", create=True)
    spool.close()
    help_text = CliRunner().invoke(main, ["failed", "list", "--help"]).output
    assert "ZEROLOSS_FAILED_LIST_LIMIT" in help_text and "ZEROLOSS_FAILED_LIST_JSON" in help_text
    out = CliRunner().invoke(
        main, ["failed", "list", "--source", f"spool://{tmp_path / 'spool'}"], env={"ZEROLOSS_FAILED_LIST_JSON": "1"}
    )
    assert out.exit_code == 0 and out.output.strip() == "[]", out.output
    bad = CliRunner().invoke(
        main,
        ["failed", "list", "--source", f"spool://{tmp_path / 'spool'}"],
        env={"ZEROLOSS_FAILED_LIST_LIMIT": "many"},
    )
    assert bad.exit_code == 2 and "ZEROLOSS_FAILED_LIST_LIMIT" in bad.output, bad.output


def test_every_duration_ends_in_s_and_the_old_spellings_still_work(tmp_path: Path) -> None:
    for name, cmd in _commands(main):
        for opt in _visible_options(cmd):
            if isinstance(opt.type, click.types.FloatParamType):  # every float option is a duration
                assert max(opt.opts, key=len).endswith("-s"), (name, opt.opts)
    status_help = CliRunner().invoke(main, ["status", "--help"]).output
    assert "--watch-s" in status_help and "--watch " not in status_help  # hidden, still accepted
    url = f"sqlite:///{tmp_path / 'a.db'}"
    SqlOutbox(url).create_schema()
    inbox = ["--inbox", f"sqlite:///{tmp_path / 'inbox.db'}", "--group", "g"]
    new = CliRunner().invoke(main, ["audit", "--source", url, *inbox, "--since-s", "60"])
    old = CliRunner().invoke(main, ["audit", "--source", url, *inbox, "--since", "60"])
    assert new.exit_code == old.exit_code == 0, (new.output, old.output)
    assert "created in the last 60s" in new.output and "created in the last 60s" in old.output
    assert "--since is deprecated; write --since-s" in old.output and "deprecated" not in new.output


def test_spool_only_commands_name_spool_urls_only_and_dlq_does_not_offer_rabbitmq() -> None:
    for state in ("doubt", "malformed"):
        for sub in ("list", "show", "purge"):
            text = CliRunner().invoke(main, [state, sub, "--help"]).output
            assert "spool:///DIR" in text and "sqlite" not in text and "postgresql" not in text, text
            assert "--table" not in text, text
    assert "postgresql://" in CliRunner().invoke(main, ["failed", "list", "--help"]).output
    for sub in ("list", "show", "replay"):
        text = CliRunner().invoke(main, ["dlq", sub, "--help"]).output
        assert "--topic TOPIC" in text and "kafka://" in text and "amqp://" not in text, text


def test_dlq_takes_topic_the_old_argument_still_works_and_rows_stay_one_line() -> None:
    require_service("redis")
    from zeroloss.consumer.dead_letters import dead_letter
    from zeroloss.message import uuid7
    from zeroloss.registry import open_broker

    topic = unique_topic("dlq-help")
    letters = [dead_letter(message_id=uuid7(), topic=topic, partition=0, offset=n, key=b"k", value=b"v",
                           headers=(), error=ValueError(f"line one of {n}\nline two\n\nline three"), attempts=3,
                           first_failure=time.time()) for n in range(2)]  # fmt: skip
    broker = open_broker(REDIS_URL)
    try:
        broker.publish(letters)
    finally:
        broker.close()
    new = CliRunner().invoke(main, ["dlq", "list", "--target", REDIS_URL, "--topic", topic])
    assert new.exit_code == 0, new.output
    rows = new.output.splitlines()
    assert len(rows) == 3 and rows[-1] == f"2 dead letter(s) in {topic}.dlq", rows
    assert "ValueError: line one of 0 | line two | line three" in rows[0], rows
    old = CliRunner().invoke(main, ["dlq", "list", "--target", REDIS_URL, topic])
    assert old.exit_code == 0 and f"deprecated; write --topic {topic}" in old.output, old.output
    assert old.output.splitlines()[1:] == rows
    shown = CliRunner().invoke(main, ["dlq", "show", "--target", REDIS_URL, "--topic", topic, letters[1].id])
    assert shown.exit_code == 0 and "line one of 1" in shown.output, shown.output
    neither = CliRunner().invoke(main, ["dlq", "show", "--target", REDIS_URL])
    assert neither.exit_code == 2 and "--topic" in neither.output


@pytest.mark.parametrize("kind", ["sql", "spool"])
def test_failed_list_rows_stay_one_line_with_a_multi_line_error(tmp_path: Path, kind: str) -> None:
    from dataclasses import replace

    store: SqlOutbox | FileSpool
    if kind == "sql":
        url = f"sqlite:///{tmp_path / 'a.db'}"
        store = sql = SqlOutbox(url)
        sql.create_schema()
        with sql.engine.begin() as conn:
            sql.add(conn, topic="t", value=b"x")
    else:
        url = f"spool://{tmp_path / 'spool'}"
        store = spool = FileSpool(tmp_path / "spool", create=True)
        with spool.transaction() as tx:
            tx.add(topic="t", value=b"x")
    [m] = store.claim(1, 30)
    store.fail([replace(m, last_error="broker said no\n[SQL: INSERT ...]\nmore")])
    store.close()
    out = CliRunner().invoke(main, ["failed", "list", "--source", url])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert len(lines) == 2 and "broker said no | [SQL: INSERT ...] | more" in lines[0], lines
