"""The Order Service: HTTP API, storage with a transactional outbox, relay, email status.

An accepted order is never lost: its row and its ``order.created`` event (in the
outbox) commit in one transaction, and the relay publishes the outbox to Redis.
"""

from orderflow.orders.api import create_app
from orderflow.orders.database import Database
from orderflow.orders.email_status import EmailStatusConsumer
from orderflow.orders.reconcile import Reconciler
from orderflow.orders.relay import OutboxRelay, RelayConfig
from orderflow.orders.store import CreateResult, Order, OrderConflict, OrderStore
from orderflow.orders.validation import OrderRequest

__all__ = [
    "CreateResult",
    "Database",
    "EmailStatusConsumer",
    "Order",
    "OrderConflict",
    "OrderRequest",
    "OrderStore",
    "OutboxRelay",
    "Reconciler",
    "RelayConfig",
    "create_app",
]
