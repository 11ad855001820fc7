"""The consumer: ``handler(msg, tx)`` in one inbox transaction per message; acks and offsets only
after it committed. :class:`Consumer` is the runtime; the rest of the package is where a message
goes next — a broker's loop (``kafka_loop``, ``subscription_loop``), the one handling loop
(``handling``), then a retry topic (``retry_topics``), a dead letter (``dead_letters``) or a Kafka
transaction (``kafka_txn``).
"""

from zeroloss.consumer.handling import TransactionAborted
from zeroloss.consumer.kafka_loop import consumer_config
from zeroloss.consumer.runtime import Consumer, ConsumerCounters
from zeroloss.consumer.settings import ConsumerSettings
from zeroloss.received import Handler, PoisonMessage, Received

__all__ = [
    "Consumer",
    "ConsumerCounters",
    "ConsumerSettings",
    "Handler",
    "PoisonMessage",
    "Received",
    "TransactionAborted",
    "consumer_config",
]
