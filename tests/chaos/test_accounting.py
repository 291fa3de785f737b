"""The accounting's rules, each on made-up records: fast, no process, no socket."""

from __future__ import annotations

import pytest

from .accounting import (
    Connection,
    FaultLog,
    Mail,
    UnparsableMessage,
    account_mail,
    order_id_of,
    recorded_orders,
)


def _raw(order_id: int) -> bytes:
    return (
        f"From: shop@example.com\r\nTo: a@example.com\r\n"
        f"Message-ID: <order-{order_id}@orderflow.localhost>\r\n\r\nhello\r\n"
    ).encode()


def _mail(order_id: int, at: float, connection: int) -> Mail:
    return Mail(order_id, ["a@example.com"], _raw(order_id), at, connection)


class Run:
    """A made-up run: connections, mails and faults, in a few lines each."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.connections: dict[int, Connection] = {}
        self.faults = FaultLog()

    def connection(
        self, number: int, port: int, opened: float, closed: float | None, *, quit: bool = False
    ) -> None:
        self.connections[number] = Connection(number, port, opened, closed, quit)

    def mail(self, order_id: int, at: float, connection: int) -> None:
        self.mails.append(_mail(order_id, at, connection))

    def account(self, accepted: list[int]) -> tuple[dict[int, str], dict[int, str]]:
        result = account_mail(accepted, self.mails, self.connections, self.faults, lease_s=3.0)
        return result.excused, result.unexplained


def test_every_accepted_order_once_passes() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, None)
    run.mail(1, 1.0, 1)
    run.mail(2, 2.0, 1)
    result = account_mail([1, 2, 3], run.mails, run.connections, run.faults, lease_s=3.0)
    assert result.lost == [3]
    assert result.unexpected == []
    assert result.duplicates == {}
    assert dict(result.by_order) == {1: 1, 2: 1}


def test_an_email_for_an_order_not_accepted_is_unexpected() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, None)
    run.mail(9, 1.0, 1)
    assert account_mail([], run.mails, run.connections, run.faults, lease_s=3.0).unexpected == [9]


def test_a_duplicate_without_any_fault_is_unexplained() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, 5.0)
    run.connection(2, 40002, 0.0, None)
    run.mail(1, 1.0, 1)
    run.mail(1, 3.0, 2)
    excused, unexplained = run.account([1])
    assert excused == {}
    assert "no fault cut connection 1" in unexplained[1]


def test_the_last_message_of_a_connection_a_kill_cut_is_excused() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, 2.01)
    run.connection(2, 40002, 2.5, None)
    run.mail(5, 1.0, 1)
    run.mail(1, 2.0, 1)  # the last on connection 1; its worker killed at 2.0
    run.mail(1, 4.0, 2)
    run.faults.cut("worker-0 SIGKILLed", 2.0, {40001, 40009})
    excused, unexplained = run.account([1, 5])
    assert unexplained == {}
    assert excused == {1: "cut: worker-0 SIGKILLed"}


def test_one_message_after_the_copy_is_allowed_two_are_not() -> None:
    for followers, explained in ((1, True), (2, False)):
        run = Run()
        run.connection(1, 40001, 0.0, 3.1)
        run.connection(2, 40002, 3.5, None)
        run.mail(1, 1.0, 1)
        for n in range(followers):
            run.mail(10 + n, 1.5 + n * 0.5, 1)
        run.mail(1, 4.0, 2)
        run.faults.cut("worker-0 SIGKILLed", 3.0, {40001})
        _, unexplained = run.account([1, 10, 11])
        assert (unexplained == {}) is explained, (followers, unexplained)
        if not explained:
            assert "2 messages followed it" in unexplained[1]


def test_a_copy_on_a_connection_that_said_quit_is_not_excused_by_a_cut() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, 2.5, quit=True)
    run.connection(2, 40002, 3.0, None)
    run.mail(1, 1.0, 1)
    run.mail(1, 4.0, 2)
    run.faults.cut("worker-0 SIGKILLed", 2.0, {40001})
    _, unexplained = run.account([1])
    assert "ended with QUIT" in unexplained[1]


def test_a_cut_of_other_connections_or_at_another_time_excuses_nothing() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, 2.5)
    run.connection(2, 40002, 3.0, None)
    run.mail(1, 1.0, 1)
    run.mail(1, 4.0, 2)
    run.faults.cut("worker-1 SIGKILLed", 2.0, {40007})  # another worker's connections
    run.faults.cut("worker-0 SIGKILLed", 2.6, {40001})  # after connection 1 had ended
    _, unexplained = run.account([1])
    assert 1 in unexplained


def test_a_copy_taken_just_after_the_reset_that_cut_it_is_excused() -> None:
    # Seen in the network scenario: the proxy reset the link while the message's bytes
    # were on their way; the server took it 15 ms later and could not answer.
    run = Run()
    run.connection(1, 40001, 0.0, 1.449)
    run.connection(2, 40002, 1.5, None)
    run.mail(1, 1.434, 1)
    run.mail(1, 1.602, 2)
    run.faults.cut("SMTP link reset", 1.419, {40001})
    excused, _ = run.account([1])
    assert excused == {1: "cut: SMTP link reset"}


def test_a_reused_client_port_excuses_only_the_connection_open_at_the_cut() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, 1.5)  # ended long before the kill, same port
    run.connection(2, 40001, 2.0, 5.01)
    run.connection(3, 40003, 6.0, None)
    run.mail(1, 1.0, 1)
    run.mail(1, 7.0, 3)
    run.faults.cut("worker-0 SIGKILLed", 5.0, {40001})
    _, unexplained = run.account([1])
    assert 1 in unexplained


def test_a_copy_accepted_while_redis_was_down_is_excused_only_inside_the_outage() -> None:
    for at, explained in ((10.0, True), (12.0, True), (9.999, False), (12.001, False)):
        run = Run()
        run.connection(1, 40001, 0.0, None)
        run.mail(1, at, 1)
        run.mail(1, 20.0, 1)
        run.faults.outage("Redis killed", 10.0, 12.0)
        excused, unexplained = run.account([1])
        assert (1 in excused) is explained, at
        assert (1 in unexplained) is not explained, at


def test_a_dropped_record_excuses_only_its_order_and_only_after_the_copy() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, None)
    run.mail(1, 1.0, 1)
    run.mail(2, 1.0, 1)
    run.mail(3, 1.0, 1)
    run.mail(1, 9.0, 1)
    run.mail(2, 9.0, 1)
    run.mail(3, 9.0, 1)
    run.faults.dropped_records.append((1, 1.1, "Redis link silent"))
    run.faults.dropped_records.append((2, 0.9, "Redis link silent"))  # before the send
    excused, unexplained = run.account([1, 2, 3])
    assert excused == {1: "record dropped: Redis link silent"}
    assert set(unexplained) == {2, 3}


def test_every_copy_but_the_last_needs_its_own_fault() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, 2.01)
    run.connection(2, 40002, 2.5, 8.0, quit=True)
    run.connection(3, 40003, 9.0, None)
    run.mail(1, 2.0, 1)  # cut by the kill: excused
    run.mail(1, 3.0, 2)  # its connection said QUIT: the third copy is unexplained
    run.mail(1, 9.5, 3)
    run.faults.cut("worker-0 SIGKILLed", 2.0, {40001})
    excused, unexplained = run.account([1])
    assert excused == {}
    assert "ended with QUIT" in unexplained[1]


def test_an_unparsable_message_is_reported_not_left_out() -> None:
    run = Run()
    run.connection(1, 40001, 0.0, None)
    run.mail(1, 1.0, 1)
    run.mails.append(Mail(None, ["a@example.com"], b"Subject: x\r\n\r\n", 2.0, 1, "no id"))
    result = account_mail([1], run.mails, run.connections, run.faults, lease_s=3.0)
    assert result.unparsable == [(1, "no id")]


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: no id\r\n\r\nbody",
        b"Message-ID: <order-x@host>\r\n\r\n",
        b"Message-ID: <order-1@host> trailing\r\n\r\n",
        b"Message-ID: <other-1@host>\r\n\r\n",
        b"Message-ID: <order-1@host>\r\nMessage-ID: <order-2@host>\r\n\r\n",
        b"Subject: x\r\n\r\nMessage-ID: <order-1@host>\r\n",  # in the body, not a header
    ],
)
def test_message_ids_that_name_no_single_order_are_refused(raw: bytes) -> None:
    with pytest.raises(UnparsableMessage):
        order_id_of(raw)


def test_message_id_parsing() -> None:
    assert order_id_of(_raw(42)) == 42
    folded = b"Subject: x\r\nMessage-ID:\r\n <order-7@orderflow.localhost>\r\n\r\n"
    assert order_id_of(folded) == 7


def test_recorded_orders_finds_message_ids_in_redis_commands() -> None:
    command = b"*9\r\n$7\r\nEVALSHA\r\n$31\r\n<order-12@orderflow.localhost>\r\n"
    assert recorded_orders(command) == {12}
    assert recorded_orders(b"orderflow:email:{12} token") == set()


def test_a_copy_sent_again_before_its_lease_can_have_run_out_is_not_excused_by_redis() -> None:
    # A ledger that let a sent order be claimed again sends the copies milliseconds
    # apart; a lost record only lets another sender in once the lease has run out.
    for gap, explained in ((0.02, False), (0.99, False), (1.0, True), (2.5, True)):
        run = Run()
        run.connection(1, 40001, 0.0, None)
        run.mail(1, 10.5, 1)
        run.mail(1, 10.5 + gap, 1)
        run.faults.outage("Redis killed", 10.0, 11.0)
        run.faults.dropped_records.append((1, 10.6, "Redis link silent"))
        excused, unexplained = run.account([1])
        assert (1 in excused) is explained, gap
        if not explained:
            assert "before its lease (3.0s) can have run out" in unexplained[1]


def test_a_cut_copy_may_be_sent_again_at_once() -> None:
    # Its sender saw the send fail (the reply never came) and gave the order back.
    run = Run()
    run.connection(1, 40001, 0.0, 2.01)
    run.connection(2, 40002, 2.05, None)
    run.mail(1, 2.0, 1)
    run.mail(1, 2.1, 2)
    run.faults.cut("SMTP link reset", 2.0, {40001})
    excused, _ = run.account([1])
    assert excused == {1: "cut: SMTP link reset"}
