"""Every error zeroloss raises derives from :class:`ZerolossError`.
The details: docs/design.md, "errors.py"."""

from __future__ import annotations


class ZerolossError(Exception):
    """Root of every zeroloss error."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(ZerolossError):
    """A URL, option or setting is wrong; the message says what to fix."""


class MissingExtraError(ConfigError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package {package!r}, which is not installed; "
            f"install it with: pip install 'zeroloss[{extra}]'"
        )
        self.package = package
        self.extra = extra


class MessageError(ZerolossError):
    """A message that can never be sent as it is (wrong type, bad topic name, too large)."""


class MalformedMessageError(ZerolossError):
    """Bytes that are not a complete, intact zeroloss message (truncated, bit-flipped, foreign)."""


class UnknownMessageError(ZerolossError):
    """No message with the given id exists in the state that was asked for."""


class StoreError(ZerolossError):
    """The outbox or inbox store failed; ``retriable`` says whether trying again can help."""


class StoreSetupError(StoreError):
    """The store cannot be used as configured (its table or database file is missing, the server
    refused the login or database): waiting will not fix it, so the command line exits 2."""


class SpoolFullError(StoreError):
    """The spool's filesystem is full: nothing was written, the caller's transaction should roll back."""

    retriable = True


class TransactionLostError(ZerolossError):
    """An inbox transaction had ended before its commit — the database rolled it back after an
    error the handler caught (a deadlock), or the handler ended it. Nothing of it was committed;
    the consumer counts it as the handler's failure and runs the message again."""

    retriable = True


class BrokerError(ZerolossError):
    """The broker could not be reached or refused the work."""

    retriable = True
