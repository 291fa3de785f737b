"""Case 3 (pending): end to end, orders POSTed to the API → emails accepted by the SMTP sink.

Not run yet: it needs the Order and Email services, written in parallel with these
benchmarks. The plan, for whoever finishes it:

1. Start the whole stack as ``orderflow up`` does (embedded Redis, API with its outbox
   relay, email workers, the SMTP sink delivering to a Maildir) in a temporary data dir.
2. Saturation: POST orders from ``CLIENTS`` concurrent httpx clients for ``seconds``;
   the rate is emails accepted by the sink per second once steady (sink count over time).
3. Latency at half the saturation rate, open loop: POST at a fixed rate, stamping each
   order's send time (``time.time_ns()``, wall clock, as the sink's files carry it); the
   email's arrival is its Maildir file's mtime, matched to the order by its deterministic
   ``Message-ID: <order-{id}@domain>`` (``orderflow.email.render.message_id_for``), or by
   the subject ``Order #{id} confirmed``; p50 and p99.
4. Targets: ≥ 1,000 orders/s on 2 cores; p99 order → email ≤ 50 ms at half saturation.
5. Wire it into ``bench/__main__.py`` (a ``"end-to-end"`` entry in ``CASES``), and drop
   ``_end_to_end_pending`` from ``bench/report.py`` in favour of a table of its figures
   and a row in ``TARGETS``.

The load generator is itself Python on the same two cores: give it its own process (or
``httpx`` with HTTP/1.1 keep-alive and a few hundred connections) and report how much
CPU it took, so the figure is the stack's and not the client's.
"""

from __future__ import annotations

from bench.common import Figure

CASE = "end to end"
CLIENTS = 32


async def run(url: str, *, seconds: float) -> list[Figure]:
    """Not implemented yet: see the module docstring."""
    raise NotImplementedError("case 3 (end to end) is pending the Order and Email services")
