"""``zeroloss show ID`` (one message in any state) and ``zeroloss failed|doubt|malformed
list|show|retry|purge``: the messages that wait for a person.

* ``failed``: attempts exhausted or not sendable. ``retry`` = requeue (attempts reset, the key
  un-parked); ``purge`` deletes (the key un-parks too).
* ``doubt`` (spool only): committed or not is unknown. Look the transaction id up in the app's
  database: committed → ``retry``; rolled back → ``purge``.
* ``malformed`` (spool only): a file that does not decode, quarantined. It cannot be retried;
  inspect it with ``show`` and ``purge`` it. Its id is its file name in ``malformed/``.

Ids that are not in the state refuse the whole command with exit 2, changing nothing. ``purge``
without ``--yes`` says what it would delete and exits 1. Bulk work shows a progress bar on stderr.
(Over 400 lines: ``show`` and the three state groups render a message the same way, with the
same private helpers.)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from zeroloss.cli._base import (
    EXIT_PROBLEM,
    EXIT_USAGE,
    errors_to_exit_codes,
    json_option,
    main,
    opened_store,
    option,
    source_options,
)
from zeroloss.errors import MalformedMessageError, UnknownMessageError
from zeroloss.logs import one_line
from zeroloss.message import Message, decode
from zeroloss.outbox.base import OutboxAdmin, State

_CHUNK = 100
_SHOW_BYTES = 1024
_ALL = 10**9

_HELP = {
    State.FAILED: "Messages whose attempts ran out or that the broker can never take; each parks its key.",
    State.DOUBT: "Spool only: tmp files found after a crash whose transaction outcome is unknown. Check the "
    "transaction id in your database: committed -> retry, rolled back -> purge.",
    State.MALFORMED: "Spool only: quarantined files that do not decode (truncated, bit-flipped, foreign). They "
    "cannot be retried; show and purge them. A malformed message's id is its file name.",
}


def _not_here(store: OutboxAdmin, state: State) -> str | None:
    if state in store.states:
        return None
    return (
        f"this outbox ({type(store).__name__}) never has {state.value} messages: they occur only in a file "
        "spool (a SQL outbox row commits with the app's transaction and the database keeps it intact)"
    )


def _text_or_hex(data: bytes | None, full: bool, limit: int = _SHOW_BYTES) -> tuple[str, str]:
    """(how it is shown, what it is: 'text' / 'hex' / 'none'), truncated unless ``full``."""
    if data is None:
        return "-", "none"
    cut = data if full else data[:limit]
    more = "" if full or len(data) <= limit else f"... ({len(data) - limit} more bytes; --full shows all)"
    try:
        return cut.decode("utf-8") + more, "text"
    except UnicodeDecodeError:
        if not full and len(data) > limit:  # a cut may split a character: decide on the whole
            try:
                data.decode("utf-8")
                return cut.decode("utf-8", errors="replace") + more, "text"
            except UnicodeDecodeError:
                pass
        return cut.hex() + more, "hex"


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row(m: Message, txids: dict[str, str]) -> dict[str, Any]:
    key, _ = _text_or_hex(m.key, False, 40)
    return {
        "id": m.id,
        "topic": m.topic,
        "key": key,
        "attempts": m.attempts,
        "created_at": _when(m.created_at),
        "last_error": m.last_error,
        **({"transaction": txids[m.id]} if m.id in txids else {}),
    }


def _txids(store: OutboxAdmin, state: State) -> dict[str, str]:
    get: Callable[[State], dict[str, str]] | None = getattr(store, "transaction_ids", None)
    return get(state) if get is not None and state is State.DOUBT else {}


def _malformed_names(store: OutboxAdmin) -> list[str]:
    paths: Callable[[], list[str]] | None = getattr(store, "malformed_paths", None)
    return [os.path.basename(p) for p in paths()] if paths is not None else []


def _malformed_path(store: OutboxAdmin, name: str) -> str:
    paths: Callable[[], list[str]] = getattr(store, "malformed_paths", list)
    for p in paths():
        if os.path.basename(p) == name:
            return p
    raise UnknownMessageError(f"no file {name!r} in malformed/; `zeroloss malformed list` shows them")


def _why_malformed(data: bytes) -> str:
    try:
        decode(data)
    except MalformedMessageError as exc:
        return str(exc)
    return "decodes now; it was quarantined for its name or an id that did not match its file name"


def _resolve(store: OutboxAdmin, state: State, ids: Sequence[str], all_: bool, changes: bool = True) -> list[str]:
    """The ids the command acts on, all checked to be in ``state``; exit 2 naming the others.
    ``changes``: the command would change them (retry, purge), so the refusal says nothing was."""
    if bool(ids) == all_:
        raise click.UsageError("give message ids or --all (not both)")
    if state is State.MALFORMED:
        names = _malformed_names(store)
        if all_:
            return names
        wrong = [f"{i} (no such file in malformed/)" for i in ids if i not in set(names)]
    else:
        if all_:
            return [m.id for m in store.list(state, limit=_ALL)] if state in store.states else []
        wrong = []
        for mid in dict.fromkeys(ids):
            try:
                where = store.get(mid)[0].value
            except MalformedMessageError:
                where = "malformed"
            except UnknownMessageError:
                where = "no such message"
            if where != state.value:
                wrong.append(f"{mid} ({where})")
    if wrong:
        note = _not_here(store, state) or f"`zeroloss {state.value} list` shows the {state.value} ones"
        if not changes and state is not State.MALFORMED:
            note += "; `zeroloss show ID` shows a message in any state"
        refused = f"not {state.value}, so nothing was changed" if changes else f"not {state.value}"
        click.echo(f"error: {refused}: {', '.join(wrong)}; {note}", err=True)
        sys.exit(EXIT_USAGE)
    return list(dict.fromkeys(ids))


def _in_chunks(ids: list[str], label: str, fn: Callable[[list[str]], int]) -> int:
    """``fn`` over chunks of ``ids``; a progress bar on stderr when there is more than one chunk."""
    if len(ids) <= _CHUNK:
        return fn(ids)
    done = 0
    with click.progressbar(length=len(ids), label=label, file=sys.stderr) as bar:
        for i in range(0, len(ids), _CHUNK):
            part = ids[i : i + _CHUNK]
            done += fn(part)
            bar.update(len(part))
    return done


def _state_group(state: State) -> click.Group:
    source_opt = source_options(spool_only=state is not State.FAILED)
    group = click.Group(
        state.value,
        help=_HELP[state],
        epilog=(
            "Exit codes: 0 done; 1 purge without --yes (it only says what it would delete); 2 bad usage, or an id "
            f"that is not {state.value} (the whole command is refused, nothing changes)."
        ),
    )

    @group.command("list")
    @source_opt
    @json_option
    @option("--limit", default=100, show_default=True, type=click.IntRange(1), help="Show at most this many.")
    @errors_to_exit_codes
    def list_cmd(source: str, table: str, as_json: bool, limit: int) -> None:
        """List them, oldest first."""
        with opened_store(source, table) as store:
            note = _not_here(store, state)
            if note:
                click.echo(json.dumps([]) if as_json else note)
                return
            total = store.stats().counts.get(state, 0)
            if state is State.MALFORMED:
                rows: list[dict[str, Any]] = []
                for name in _malformed_names(store)[:limit]:
                    st = os.stat(_malformed_path(store, name))
                    rows.append({"id": name, "bytes": st.st_size, "quarantined_at": _when(st.st_mtime)})
            else:
                txids = _txids(store, state)
                rows = [_row(m, txids) for m in store.list(state, limit=limit)]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            if state is State.MALFORMED:
                click.echo(f"{r['id']}  {r['bytes']} bytes  quarantined {r['quarantined_at']}")
            else:
                tx = f"  tx={r['transaction']}" if "transaction" in r else ""
                err = one_line(r["last_error"] or "")[:80]
                click.echo(
                    f"{r['id']}  {r['topic']}  key={r['key']}  attempts={r['attempts']}  "
                    f"created {r['created_at']}{tx}  {err}".rstrip()
                )
        shown = f"showing {len(rows)} of {total}" if len(rows) < total else f"{total}"
        click.echo(f"{shown} {state.value} message(s)")

    @group.command("show")
    @source_opt
    @json_option
    @click.argument("message_id")
    @option("--full", is_flag=True, help=f"Show the whole value (default: the first {_SHOW_BYTES} bytes).")
    @errors_to_exit_codes
    def show(source: str, table: str, as_json: bool, message_id: str, full: bool) -> None:
        """Every field of one message; the value as text if UTF-8, else hex."""
        with opened_store(source, table) as store:
            _resolve(store, state, [message_id], False, changes=False)
            if state is State.MALFORMED:
                path = _malformed_path(store, message_id)
                with open(path, "rb") as f:
                    data = f.read()
                shown, kind = _text_or_hex(data, full)
                doc: dict[str, Any] = {
                    "id": message_id,
                    "state": state.value,
                    "path": path,
                    "bytes": len(data),
                    "quarantined_at": _when(os.stat(path).st_mtime),
                    "why": _why_malformed(data),
                    f"content_{kind}": shown,
                }
            else:
                _, m = store.get(message_id)
                value, kind = _text_or_hex(m.value, full)
                key, key_kind = _text_or_hex(m.key, True)
                doc = {
                    "id": m.id,
                    "state": state.value,
                    "topic": m.topic,
                    f"key_{key_kind}": key,
                    "headers": {k: _text_or_hex(v, True)[0] for k, v in m.headers},
                    "created_at": _when(m.created_at),
                    "attempts": m.attempts,
                    "not_before": _when(m.not_before),
                    "last_error": m.last_error,
                    "bytes": len(m.value),
                    f"value_{kind}": value,
                }
                if (tx := _txids(store, state).get(m.id)) is not None:
                    doc["transaction"] = tx
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        for k, v in doc.items():
            click.echo(f"{k + ':':<16}{v}")

    if state is State.MALFORMED:

        @group.command("retry", hidden=True, context_settings={"ignore_unknown_options": True})
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def no_retry(args: tuple[str, ...]) -> None:
            """Refused: there is no message to send again, only bytes that did not decode."""
            click.echo(
                "error: a malformed file cannot be retried: its bytes do not decode as a message, so there is "
                "nothing to send again. `zeroloss malformed show NAME` says why it was quarantined; if the "
                "message matters, add it again from the application, then `zeroloss malformed purge NAME --yes`",
                err=True,
            )
            sys.exit(EXIT_USAGE)

    else:

        @group.command("retry")
        @source_opt
        @click.argument("message_ids", nargs=-1)
        @option("--all", "all_", is_flag=True, help=f"Every {state.value} message.")
        @errors_to_exit_codes
        def retry(source: str, table: str, message_ids: tuple[str, ...], all_: bool) -> None:
            """Back to pending with attempts reset; the relay sends them again, in key order."""
            with opened_store(source, table) as store:
                ids = _resolve(store, state, message_ids, all_)
                if not ids:
                    click.echo(_not_here(store, state) or f"no {state.value} messages to retry")
                    return
                n = _in_chunks(ids, f"retrying {len(ids)}", store.requeue)
            click.echo(f"{n} message(s) back to pending; the relay will send them")

    @group.command("purge")
    @source_opt
    @click.argument("message_ids", nargs=-1)
    @option("--all", "all_", is_flag=True, help=f"Every {state.value} message.")
    @option("--yes", is_flag=True, help="Really delete. Without it: say what would go, exit 1.")
    @errors_to_exit_codes
    def purge(source: str, table: str, message_ids: tuple[str, ...], all_: bool, yes: bool) -> None:
        """Delete them for good (malformed: the quarantined files). Needs --yes."""
        with opened_store(source, table) as store:
            ids = _resolve(store, state, message_ids, all_)
            if not ids:
                click.echo(_not_here(store, state) or f"no {state.value} messages to purge")
                return
            if not yes:
                listed = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
                click.echo(
                    f"would delete {len(ids)} {state.value} message(s): {listed}\n"
                    "nothing was deleted; run again with --yes to delete them"
                )
                sys.exit(EXIT_PROBLEM)
            n = _in_chunks(ids, f"purging {len(ids)}", lambda part: store.purge(state, part))
        click.echo(f"deleted {n} {state.value} message(s)")

    return group


for _state in (State.FAILED, State.DOUBT, State.MALFORMED):
    main.add_command(_state_group(_state))


_NEXT = {
    State.TMP: "written in an application transaction not committed yet; a crash leftover is settled by the "
    "relay's recover (promoted, discarded, or moved to doubt)",
    State.PENDING: "waiting for the relay",
    State.SENDING: "claimed by a relay, which is publishing it (an expired lease returns it to pending)",
    State.SUCCESS: "delivered: the broker acknowledged it",
    State.FAILED: "waits for a person: `zeroloss failed retry ID` sends it again, `zeroloss failed purge ID --yes` "
    "deletes it",
    State.DOUBT: "waits for a person: committed -> `zeroloss doubt retry ID`, rolled back -> `zeroloss doubt purge "
    "ID --yes`",
    State.MALFORMED: "quarantined, never sent: inspect it, then `zeroloss malformed purge NAME --yes`",
}


@main.command("show")
@source_options()
@click.argument("message_id")
@option(
    "--inbox",
    "inbox_url",
    metavar="URL",
    help="Also say whether --group handled it: the consumer's inbox (SQL URL or redis://).",
)
@option("--inbox-table", default="zeroloss_inbox", show_default=True, help="The SQL inbox's table name.")
@option("--group", metavar="G", help="The consumer group to look up in --inbox.")
@option("--full", is_flag=True, help=f"Show the whole value (default: the first {_SHOW_BYTES} bytes).")
@json_option
@errors_to_exit_codes
def show_any(
    source: str,
    table: str,
    message_id: str,
    inbox_url: str | None,
    inbox_table: str,
    group: str | None,
    full: bool,
    as_json: bool,
) -> None:
    """One message in whatever state it is: pending, sending, success (with where the broker put
    it), failed (with its error), doubt, malformed; with --inbox and --group, whether that consumer
    group handled it. An id the outbox does not know exits 2."""
    if (inbox_url is None) != (group is None):
        raise click.UsageError("--inbox URL and --group G go together")
    with opened_store(source, table) as store:
        doc = _describe(store, message_id, full)
    if inbox_url is not None and group is not None:
        from zeroloss.audit import open_inbox
        from zeroloss.registry import safe_url

        inbox = open_inbox(inbox_url, inbox_table)
        try:
            handled = inbox.seen(group, doc["id"])
        finally:
            inbox.close()
        doc["inbox"] = safe_url(inbox_url)
        doc["handled_by_group"] = {"group": group, "handled": handled}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    handled_doc = doc.pop("handled_by_group", None)
    for k, v in doc.items():
        click.echo(f"{k + ':':<16}{v}")
    if handled_doc is not None:
        verdict = (
            "yes: its effects are committed in the inbox's database"
            if handled_doc["handled"]
            else "no: not (yet) handled by this group, or its claim was purged after the inbox's retention"
        )
        click.echo(f"{'handled:':<16}{verdict} (group {handled_doc['group']})")


def _describe(store: OutboxAdmin, message_id: str, full: bool) -> dict[str, Any]:
    """Every field of the message, its state and what happens next; UnknownMessageError if none."""
    try:
        state, m = store.get(message_id)
    except MalformedMessageError:  # quarantined: its file is named after the id it claimed
        return _malformed_doc(store, next(n for n in _malformed_names(store) if n.startswith(message_id)), full)
    except UnknownMessageError:
        if message_id in _malformed_names(store):  # a malformed file named by its file name
            return _malformed_doc(store, message_id, full)
        raise UnknownMessageError(
            f"no message {message_id!r} in this outbox, in any state; check the id and --source (a success "
            "message is deleted after the relay's retention, 7 days by default)"
        ) from None
    value, kind = _text_or_hex(m.value, full)
    key, key_kind = _text_or_hex(m.key, True)
    doc: dict[str, Any] = {
        "id": m.id,
        "state": state.value,
        "next": _NEXT[state],
        "topic": m.topic,
        f"key_{key_kind}": key,
    }
    if state is State.SUCCESS:
        doc["location"] = store.location(m.id)
    if state is State.PENDING and m.not_before > store.now():
        doc["next"] = f"waiting out a retry backoff until {_when(m.not_before)}, then the relay sends it again"
    if state is State.PENDING and (blocker := _parked_behind(store, m.id, m.key)) is not None:
        blocked_by, blocked_in = blocker
        doc["next"] = (
            f"parked: {blocked_in.value} message {blocked_by} of its key came first and waits for a person "
            f"(`zeroloss {blocked_in.value} retry {blocked_by}` or `purge`); the relay sends this one after it"
        )
    doc.update({
        "headers": {k: _text_or_hex(v, True)[0] for k, v in m.headers}, "created_at": _when(m.created_at),
        "attempts": m.attempts, "not_before": _when(m.not_before), "last_error": m.last_error,
        "bytes": len(m.value), f"value_{kind}": value,
    })  # fmt: skip
    if state in (State.DOUBT, State.TMP):
        get: Callable[[State], dict[str, str]] | None = getattr(store, "transaction_ids", None)
        if get is not None and (tx := get(state).get(m.id)) is not None:
            doc["transaction"] = tx
    return doc


def _parked_behind(store: OutboxAdmin, message_id: str, key: bytes | None) -> tuple[str, State] | None:
    """The earlier failed (spool: or doubt) message of the same key that a pending message waits
    behind, as ``status`` counts it parked; None if there is none (among the oldest 10,000)."""
    if key is None:
        return None
    for state in (State.FAILED, State.DOUBT):
        if state in store.states:
            for other in store.list(state, limit=10_000):  # oldest first
                if other.id >= message_id:
                    break
                if other.key == key:
                    return other.id, state
    return None


def _malformed_doc(store: OutboxAdmin, name: str, full: bool) -> dict[str, Any]:
    path = _malformed_path(store, name)
    with open(path, "rb") as f:
        data = f.read()
    shown, kind = _text_or_hex(data, full)
    return {
        "id": name,
        "state": State.MALFORMED.value,
        "next": _NEXT[State.MALFORMED],
        "path": path,
        "bytes": len(data),
        "quarantined_at": _when(os.stat(path).st_mtime),
        "why": _why_malformed(data),
        f"content_{kind}": shown,
    }
