"""Helpers shared by every test suite: waiting, a clean environment, order bodies,
PostgreSQL databases and a counting SMTP handler.

``from tests import support`` then ``support.wait_until(...)`` works as it did when
this was one module; new code may import from the submodules.
"""

from __future__ import annotations

from tests.support.env import clean_env, clear_orderflow_env
from tests.support.orders import order_body
from tests.support.postgres import create_test_database, drop_test_database
from tests.support.smtp import CountingHandler, order_id_of
from tests.support.wait import poll_until, wait_until

__all__ = [
    "CountingHandler",
    "clean_env",
    "clear_orderflow_env",
    "create_test_database",
    "drop_test_database",
    "order_body",
    "order_id_of",
    "poll_until",
    "wait_until",
]
