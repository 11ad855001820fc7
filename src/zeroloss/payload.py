"""Payloads: what ``add(value=obj)`` turns into bytes and a content type, and how a handler gets it back
(bytes as they are, str as text, anything else JSON; ``Received.json()/text()/decode(Model)``).
The details: docs/design.md, "payload.py"."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import uuid
from typing import Any, TypeVar

from zeroloss.errors import MessageError

CONTENT_TYPE = "content-type"
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
T = TypeVar("T")


def _default(obj: Any) -> Any:
    """json.dumps's fallback for the types apps put in messages most."""
    if hasattr(obj, "model_dump") and callable(obj.model_dump):  # a pydantic model nested in a dict
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (dt.datetime, dt.date, dt.time)):
        return obj.isoformat()
    if isinstance(obj, (uuid.UUID, decimal.Decimal)):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def encode_value(value: object) -> tuple[bytes, str | None]:
    """The bytes of ``value`` and their content type (None for bytes: left as the app made them)."""
    if isinstance(value, bytes):
        return value, None
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        return _utf8("value", value), TEXT
    if value is None:
        raise MessageError("value is None; pass bytes (b'' for an empty message), a str, or a JSON-able object")
    if hasattr(value, "model_dump_json") and callable(value.model_dump_json):  # pydantic v2, not imported
        return str(value.model_dump_json()).encode(), JSON
    try:
        text = json.dumps(value, default=_default, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise MessageError(
            f"value of type {type(value).__name__} cannot be sent as JSON ({exc}); pass bytes you "
            "encoded yourself, a str, or dicts/lists/numbers/pydantic models/dataclasses"
        ) from exc
    except RecursionError as exc:
        raise MessageError(f"value of type {type(value).__name__} refers to itself: not JSON") from exc
    return _utf8("value", text), JSON


def encode_key(key: object) -> bytes | None:
    """A key as bytes: bytes as they are, a str as UTF-8, None as no key."""
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, str):
        return _utf8("key", key)
    raise MessageError(f"key must be bytes or str, got {type(key).__name__}")


def _utf8(what: str, text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 for it
        raise MessageError(f"{what} is not valid Unicode ({exc.reason} at {exc.start})") from exc


def decode_json(value: bytes | None) -> Any:
    """The JSON document in ``value``; MessageError saying why it is not one."""
    if value is None:
        raise MessageError("the value is empty (a null record), not JSON")
    try:  # RFC 8259: JSON between systems is UTF-8 (json.loads would guess UTF-16 from a BOM)
        return json.loads(value.decode())
    except UnicodeDecodeError as exc:
        raise MessageError(f"the value is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except ValueError as exc:  # json.JSONDecodeError
        raise MessageError(f"the value is not JSON ({exc}): {value[:80]!r}") from exc


def decode_model(value: bytes | None, model: type[T]) -> T:
    """``value`` as an instance of ``model``: a pydantic model (``model_validate_json``), a dataclass
    or any class taking the JSON object's fields as keyword arguments; MessageError if it is not one."""
    name = getattr(model, "__name__", repr(model))
    validate = getattr(model, "model_validate_json", None)
    if callable(validate):
        if value is None:
            raise MessageError(f"the value is empty (a null record), not a {name}")
        try:
            return validate(value)  # type: ignore[no-any-return]
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise MessageError(f"the value is not a valid {name}: {_short(exc)}") from exc
    data = decode_json(value)
    if not isinstance(data, dict):
        raise MessageError(f"the value is a JSON {type(data).__name__}, not an object with the fields of {name}")
    try:
        return model(**data)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"the value is not a valid {name}: {exc}") from exc


def _short(exc: Exception, limit: int = 500) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
