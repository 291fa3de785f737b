"""The Order Service: HTTP API, storage with a transactional outbox, relay, email status.

An accepted order is never lost: its row and its ``order.created`` event (in the
outbox) commit in one transaction, and the relay publishes the outbox to Redis.
``create_app`` builds the API alone; ``orderflow.app.create_app`` adds the console.
"""

from orderflow.orders.api import create_app
from orderflow.orders.database import Database
from orderflow.orders.email_status import EmailStatusConsumer
from orderflow.orders.reconcile import Reconciler
from orderflow.orders.relay import OutboxRelay, RelayConfig
from orderflow.orders.repository import CreateResult, OrderConflict, StoredOrder
from orderflow.orders.runtime import OrderRuntime
from orderflow.orders.store import OrderStore
from orderflow.orders.validation import OrderRequest

__all__ = [
    "CreateResult",
    "Database",
    "EmailStatusConsumer",
    "OrderConflict",
    "OrderRequest",
    "OrderRuntime",
    "OrderStore",
    "OutboxRelay",
    "Reconciler",
    "RelayConfig",
    "StoredOrder",
    "create_app",
]
