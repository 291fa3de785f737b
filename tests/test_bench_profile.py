"""bench/profile_stack.py's summary: each sample counts for the first specific frame from
its leaf up, a wake-up from epoll is no work, and the shares add up to the process."""

from __future__ import annotations

from pathlib import Path

from bench.profile_stack import category, summarise

SITE = "/venv/lib/python3.11/site-packages"
LIB = "/usr/lib/python3.11"
SRC = "/repo/src"


def _frame(function: str, file: str) -> str:
    return f"{function} ({file}:1)"


LOOP = [
    _frame("run", f"{SRC}/orderflow/cli/__init__.py"),
    _frame("BaseEventLoop._run_once", f"{LIB}/asyncio/base_events.py"),
]


def test_a_sample_is_what_its_nearest_specific_frame_is() -> None:
    write = _frame("_SelectorSocketTransport.write", f"{LIB}/asyncio/selector_events.py")
    redis = [_frame("round_trip", f"{SRC}/orderflow/_compat/redis.py"), write]
    commit = [_frame("Database.run_quick", f"{SRC}/orderflow/orders/database.py")]
    commit += [_frame("DefaultDialect.do_commit", f"{SITE}/sqlalchemy/engine/default.py")]
    assert category([*LOOP, *redis]) == "redis-py (commands, parsing)"
    assert category([*LOOP, *commit]) == "SQLite commit/flush (SQLAlchemy, sqlite3)"
    assert category(LOOP) == "asyncio event loop, sockets"
    # The standard library's email package is rendering; orderflow's email service is not.
    render = _frame("EmailMessage.set_content", f"{LIB}/email/message.py")
    assert category([*LOOP, render]) == "rendering (templates, MIME)"
    service = _frame("EmailService._deliver", f"{SRC}/orderflow/email/service.py")
    assert category([*LOOP, service]) == "orderflow: email service"


def test_the_summary_leaves_wake_ups_out_and_shares_the_rest(tmp_path: Path) -> None:
    select = _frame("EpollSelector.select", f"{LIB}/selectors.py")
    validate = _frame("BaseModel.model_validate", f"{SITE}/pydantic/main.py")
    raw = tmp_path / "api.txt"
    raw.write_text(
        f'process 1:"python";{";".join([*LOOP, select])} 50\n'
        f'process 1:"python";{";".join([*LOOP, validate])} 30\n'
        f'process 1:"python";{";".join(LOOP)} 10\n'
    )
    text = summarise(raw, seconds=1.0)
    assert "40 samples at work" in text
    assert "50 woken from a wait" in text
    assert "| HTTP routing, validation (pydantic) | 75.0 |" in text
    assert "| asyncio event loop, sockets | 25.0 |" in text
    assert "| `BaseModel.model_validate (pydantic/main.py)` | 75.0 |" in text
