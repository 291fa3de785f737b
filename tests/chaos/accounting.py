"""The chaos accounting: pure functions over what the SMTP server and the faults recorded.

Every email must belong to an accepted order (its ``Message-ID`` says which); every
accepted order must have one. A second copy of an email is excused only when the fault
that caused it is on record and really happened to that copy:

* **cut**: the copy's SMTP connection was ended by an injected fault (its worker
  SIGKILLed while holding it, the SMTP server stopped under it, a proxy reset it or
  dropped the server's reply on it), ended without ``QUIT``, and the copy was its
  last message (or one before the last: see ``MAX_AFTER``). The client never read the
  250, or died before recording it;
* **Redis away**: the copy was accepted while Redis (or the worker's link to it) was
  down, between the fault's start and its end, so the record of the send could not
  be written before the lease ran out;
* **record dropped**: a proxy on the Redis link dropped, after the copy was accepted,
  the command that records it sent (the only one carrying its ``<order-N@…>``), or
  reset the connection while that command was unanswered.

For the last two the next copy must also come after the first copy's lease can have
run out: nobody else can claim the order before that (its sender renews the lease
before each SMTP transaction once a third of it has passed, so at least two thirds of
it are left when the copy is accepted; ``min_gap_s`` is a third, for margin). A cut
send is different: its sender saw the send fail and gave the order back at once.

Anything else (no fault, a connection closed with ``QUIT``, a copy followed by more
messages, a time outside every outage) leaves the duplicate unexplained, and a
message whose ``Message-ID`` cannot be read fails the accounting rather than being
left out of it. Nothing here touches a process or a socket: ``test_accounting.py``
checks each rule on made-up records.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from itertools import pairwise

#: How many messages may follow the excused copy on its cut connection. The Email
#: Service gives a connection back to its pool as soon as the 250 is read, before the
#: record is written; when the record waits for a new Redis connection, the next
#: send on that connection can be accepted before the record is: one more message.
#: Seen once: the crash scenario with ORDERFLOW_CHAOS_SEED=3 (12 copies cut by one
#: SIGKILL, one of them followed by one message); never more than one.
MAX_AFTER = 1

_MESSAGE_ID = re.compile(r"<order-([0-9]+)@[^<>@\s]+>")
_HEADERS = BytesHeaderParser()


class UnparsableMessage(ValueError):
    """A message whose Message-ID does not name one order."""


def order_id_of(raw: bytes) -> int:
    """The order a message confirms, from its one ``Message-ID: <order-N@domain>``."""
    headers = _HEADERS.parsebytes(raw)
    values = headers.get_all("Message-ID") or []
    if len(values) != 1:
        raise UnparsableMessage(f"{len(values)} Message-ID headers")
    value = str(values[0]).strip()
    match = _MESSAGE_ID.fullmatch(value)
    if match is None:
        raise UnparsableMessage(f"Message-ID {value[:80]!r} is not <order-N@domain>")
    return int(match.group(1))


@dataclass
class Mail:
    """One message the SMTP server accepted."""

    #: The order its Message-ID names; None when it names none (see ``problem``).
    order_id: int | None
    rcpt_tos: list[str]
    raw: bytes
    #: When the server took it (time.monotonic, before its 250 was written).
    at: float
    #: The SMTP connection it came on.
    connection: int = 0
    #: Why its Message-ID could not be read.
    problem: str = ""


@dataclass
class Connection:
    """One SMTP connection as the server saw it."""

    number: int
    #: The client's port (as the server sees it: a proxy's, behind a proxy).
    client_port: int
    opened_at: float
    closed_at: float | None = None
    #: The client said QUIT: it had read every reply.
    quit: bool = False


@dataclass(frozen=True)
class Cut:
    """A fault that ended the SMTP connections of these client ports at ``at``."""

    what: str
    at: float
    client_ports: frozenset[int]


@dataclass(frozen=True)
class Outage:
    """Redis, or a link to it, unusable from ``start`` to ``end``."""

    what: str
    start: float
    end: float


@dataclass
class FaultLog:
    """The faults a scenario injected, as they happened."""

    cuts: list[Cut] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    #: "Sent" records a proxy dropped on the way to Redis: (order, when, which proxy).
    dropped_records: list[tuple[int, float, str]] = field(default_factory=list)

    def cut(self, what: str, at: float, client_ports: Iterable[int]) -> None:
        """Record connections cut by ``what``."""
        self.cuts.append(Cut(what, at, frozenset(client_ports)))

    def outage(self, what: str, start: float, end: float) -> None:
        """Record Redis (or a link to it) away from ``start`` to ``end``."""
        if end < start:
            raise ValueError(f"outage {what!r} ends ({end}) before it starts ({start})")
        self.outages.append(Outage(what, start, end))


@dataclass
class MailAccount:
    """Emails against accepted orders."""

    by_order: Counter[int]
    lost: list[int]
    unexpected: list[int]
    #: Messages whose Message-ID could not be read: (connection, problem).
    unparsable: list[tuple[int, str]]
    #: Orders emailed more than once, and how many times.
    duplicates: dict[int, int]
    #: The fault each excused duplicate is attributed to.
    excused: dict[int, str]
    #: Duplicates no injected fault explains, and why each excuse failed.
    unexplained: dict[int, str]
    #: For each excused cut copy, how many messages followed it on its connection.
    after_cut: list[int] = field(default_factory=list)

    @property
    def duplicate_emails(self) -> int:
        """Emails beyond the first, over every order."""
        return sum(n - 1 for n in self.duplicates.values())


def _cut_of(
    mail: Mail, connection: Connection, after: int, faults: FaultLog, max_after: int
) -> tuple[str | None, str]:
    """The cut that explains ``mail``, or None and why not."""
    if connection.quit:
        return None, f"connection {connection.number} ended with QUIT"
    if connection.closed_at is None:
        return None, f"connection {connection.number} is still open"
    if after > max_after:
        return None, f"{after} messages followed it on connection {connection.number}"
    for cut in faults.cuts:
        # The copy itself may be taken just after the cut: its bytes were on the way
        # (in the kernel's buffers) when the client died or the link was reset.
        if (
            connection.client_port in cut.client_ports
            and connection.opened_at <= cut.at <= connection.closed_at
        ):
            return cut.what, ""
    return None, f"no fault cut connection {connection.number}"


def explain_copy(
    mail: Mail,
    connection: Connection,
    after: int,
    faults: FaultLog,
    *,
    next_at: float,
    lease_s: float,
    max_after: int = MAX_AFTER,
) -> tuple[str | None, str]:
    """The injected fault that explains why ``mail`` was sent again (its next copy came
    at ``next_at``), or None and why."""
    cut, why = _cut_of(mail, connection, after, faults, max_after)
    if cut is not None:
        return f"cut: {cut}", ""
    min_gap_s = lease_s / 3
    if next_at - mail.at < min_gap_s:
        return None, (
            f"{why}; sent again {next_at - mail.at:.3f}s later, before its lease "
            f"({lease_s}s) can have run out"
        )
    for outage in faults.outages:
        if outage.start <= mail.at <= outage.end:
            return f"Redis away: {outage.what}", ""
    for order_id, at, what in faults.dropped_records:
        if order_id == mail.order_id and at >= mail.at:
            return f"record dropped: {what}", ""
    return None, f"{why}; sent outside every Redis outage"


def account_mail(
    accepted: Iterable[int],
    mails: list[Mail],
    connections: dict[int, Connection],
    faults: FaultLog,
    *,
    lease_s: float,
    max_after: int = MAX_AFTER,
) -> MailAccount:
    """Account for every message: each accepted order emailed, each extra copy excused
    by an injected fault (every copy but the last needs one), none unparsable.
    ``lease_s`` is the workers' send lease (their claim timeout)."""
    wanted = set(accepted)
    by_order: Counter[int] = Counter()
    copies: dict[int, list[Mail]] = defaultdict(list)
    on_connection: dict[int, list[Mail]] = defaultdict(list)
    unparsable: list[tuple[int, str]] = []
    for mail in sorted(mails, key=lambda m: m.at):
        on_connection[mail.connection].append(mail)
        if mail.order_id is None:
            unparsable.append((mail.connection, mail.problem or "no order"))
            continue
        by_order[mail.order_id] += 1
        copies[mail.order_id].append(mail)
    position = {
        id(mail): len(same) - 1 - n
        for same in on_connection.values()
        for n, mail in enumerate(same)
    }
    excused: dict[int, str] = {}
    unexplained: dict[int, str] = {}
    after_cut: list[int] = []
    for order_id, sent in copies.items():
        if len(sent) < 2:
            continue
        reasons = []
        for mail, following in pairwise(sent):
            connection = connections.get(mail.connection)
            if connection is None:
                unexplained[order_id] = f"connection {mail.connection} was never recorded"
                break
            after = position[id(mail)]
            reason, why = explain_copy(
                mail,
                connection,
                after,
                faults,
                next_at=following.at,
                lease_s=lease_s,
                max_after=max_after,
            )
            if reason is None:
                unexplained[order_id] = why
                break
            if reason.startswith("cut"):
                after_cut.append(after)
            reasons.append(reason)
        else:
            excused[order_id] = "; ".join(reasons)
    return MailAccount(
        by_order=by_order,
        lost=sorted(i for i in wanted if by_order[i] == 0),
        unexpected=sorted(i for i in by_order if i not in wanted),
        unparsable=unparsable,
        duplicates={i: n for i, n in by_order.items() if n > 1},
        excused=excused,
        unexplained=unexplained,
        after_cut=after_cut,
    )


#: A Message-ID as the "sent" record carries it to Redis.
_RECORDED = re.compile(rb"<order-([0-9]+)@")


def recorded_orders(data: bytes) -> set[int]:
    """The orders whose Message-ID appears in ``data`` (bytes of Redis commands): in
    the Email Service's commands, only the record of a send carries it."""
    return {int(match) for match in _RECORDED.findall(data)}
