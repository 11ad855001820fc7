"""The ``zeroloss`` click group and what every command shares: source/target options, the
translation of zeroloss errors into one line and an exit code, and the store as a context.

Exit codes, for every command: 0 ok; 1 the job ran and found a problem (lost messages, a failed
check, a purge that needs ``--yes``); 2 bad usage or configuration, including a message id that
is not where the command looks (the message says what to fix). ``status`` is the exception: it
exits 0/1/2 for its verdict ok/warn/critical, so a 2 there means critical *or* bad usage — the
message printed says which.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from zeroloss.errors import ConfigError, StoreSetupError, UnknownMessageError, ZerolossError
from zeroloss.outbox.base import OutboxAdmin

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class EnvOption(click.Option):
    """An option whose bad value, when it came from its environment variable, is reported as
    that variable: ``ZEROLOSS_BATCH_SIZE=abc`` names ZEROLOSS_BATCH_SIZE, not ``--batch-size``,
    which the user never typed."""

    def _name_envvar(self, ctx: click.Context) -> None:
        """No envvar given: ``ZEROLOSS_<COMMAND>_<OPTION>`` after the option's long name (``--json``
        gives ``..._JSON``, where click's own would use the parameter's name, ``..._AS_JSON``)."""
        if self.envvar or not self.allow_from_autoenv or ctx.auto_envvar_prefix is None:
            return
        longest = max(self.opts, key=len).lstrip("-")
        self.envvar = f"{ctx.auto_envvar_prefix}_{longest.upper().replace('-', '_')}"

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        self._name_envvar(ctx)
        return super().resolve_envvar_value(ctx)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self._name_envvar(ctx)
        return super().get_help_record(ctx)

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:
            source = ctx.get_parameter_source(self.name) if self.name else None
            if source is click.core.ParameterSource.ENVIRONMENT and isinstance(self.envvar, str):
                exc.param_hint = f"environment variable {self.envvar} (for '{self.opts[0]}')"
            raise


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """``click.option`` with :class:`EnvOption`: what every zeroloss option is declared with. Its
    environment variable is shown in ``--help``: the one given, else ``ZEROLOSS_<COMMAND>_<OPTION>``
    (the group's ``auto_envvar_prefix``, e.g. ``ZEROLOSS_STATUS_WATCH_S``)."""
    attrs.setdefault("show_envvar", True)
    return click.option(*decls, cls=EnvOption, **attrs)


def deprecated_alias(old: str, new: str, dest: str, **attrs: Any) -> Callable[[F], F]:
    """A hidden ``old`` spelling of ``new`` kept so that scripts do not break: its value goes to
    the parameter ``dest`` (read it with :func:`prefer`) and using it prints a deprecation note."""

    def note(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and ctx.get_parameter_source(param.name or "") is click.core.ParameterSource.COMMANDLINE:
            click.echo(f"note: {old} is deprecated; write {new} (same meaning)", err=True)
        return value

    return click.option(old, dest, hidden=True, default=None, callback=note, allow_from_autoenv=False, **attrs)


def prefer(new: Any, old: Any, default: Any = None) -> Any:
    """The value of an option whose deprecated alias may have been used instead."""
    return new if new is not None else (old if old is not None else default)


def errors_to_exit_codes(fn: F) -> F:
    """Turn zeroloss errors into one clear line and an exit code, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, StoreSetupError, UnknownMessageError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except ZerolossError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_PROBLEM)

    return wrapper  # type: ignore[return-value]


SOURCE_HELP = "Outbox: spool:///DIR, sqlite:///FILE, postgresql://..., mysql://..."
SPOOL_HELP = "The file spool: spool:///DIR (doubt and malformed messages occur only in a spool)."
TABLE_HELP = "SQL outbox table name (a spool has none)."
TARGET_HELP = (
    "Broker: kafka://HOST:PORT, amqp://USER:PASS@HOST/, nats://HOST:4222, redis://HOST:6379/0 "
    "or rocketmq://HOST:8081?namesrv=HOST:9876"
)


def source_options(*, required: bool = True, spool_only: bool = False) -> Callable[[F], F]:
    """``--source`` and ``--table``; ``init`` makes ``--source`` optional (it may only declare).
    ``spool_only``: a command for states only a spool has; it names spool URLs only and hides
    ``--table`` (kept, so a script that passes it does not break)."""

    def decorate(fn: F) -> F:
        fn = option(
            "--table", envvar="ZEROLOSS_TABLE", default="zeroloss_outbox", show_default=True, hidden=spool_only,
            help=TABLE_HELP,
        )(fn)  # fmt: skip
        return option(
            "--source", envvar="ZEROLOSS_SOURCE", required=required, metavar="URL",
            help=SPOOL_HELP if spool_only else SOURCE_HELP,
        )(fn)  # fmt: skip

    return decorate


def target_options(*, required: bool = True, help: str = TARGET_HELP) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        return option("--target", envvar="ZEROLOSS_TARGET", required=required, metavar="URL", help=help)(fn)

    return decorate


source_option = source_options()
target_option = target_options()


def json_option(fn: F) -> F:
    return option("--json", "as_json", is_flag=True, help="Machine-readable output (JSON).")(fn)


@contextlib.contextmanager
def opened_store(source: str, table: str) -> Iterator[OutboxAdmin]:
    from zeroloss.registry import open_store

    store = open_store(source, table=table)
    try:
        yield store
    finally:
        store.close()


@click.group(context_settings={"auto_envvar_prefix": "ZEROLOSS"})
@option("-v", "--verbose", count=True, help="More log output: -v adds zeroloss's debug lines, -vv every library's.")
@option("-q", "--quiet", count=True, help="Less log output: -q warnings and errors only, -qq errors only.")
@click.version_option(package_name="zeroloss")
def main(verbose: int, quiet: int) -> None:
    """zeroloss: lossless delivery from your database to a broker and on to your handler.

    Log lines go to stderr with their time and level; by default zeroloss's INFO lines (what the
    relay is doing) and other libraries' warnings.

    Every option can also be set by the environment variable shown beside it.

    Exit codes: 0 ok, 1 a problem was found, 2 bad usage or configuration
    (status: 0/1/2 = ok/warn/critical).
    """
    from zeroloss.logs import logging_setup

    level = min(max(logging.INFO - 10 * verbose + 10 * quiet, logging.DEBUG), logging.CRITICAL)
    others = logging.DEBUG if verbose >= 2 else max(logging.WARNING, level)
    logging_setup(level, others=others)
