"""RocketMQ transactional ("half") messages, an alternative to the outbox for RocketMQ users: the
producer (:mod:`.producer`) sends a half message, runs the app's local transaction and commits or
rolls the half message back; when the process dies in between, the broker's check-back is answered
from the app's database (:mod:`.table`, the recommended source) or the caller's own callable.
Check-backs, the fence, UNKNOWN and the broker's limits: docs/design.md, "half_messages"."""

from zeroloss.half_messages.producer import CheckBack, HalfMessageProducer, Sent
from zeroloss.half_messages.table import HalfMessageTable, Resolution, half_messages_table

__all__ = ["CheckBack", "HalfMessageProducer", "HalfMessageTable", "Resolution", "Sent", "half_messages_table"]
