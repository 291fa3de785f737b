"""Case 3 (pending): end to end, orders POSTed to the API → emails accepted by the SMTP sink.

Not run yet: it needs the Order and Email services, written in parallel with these
benchmarks. The plan, for whoever finishes it:

1. Start the whole stack as ``orderflow up`` does (embedded Redis, API with its outbox
   relay, email workers, the SMTP sink delivering to a Maildir) in a temporary data dir.
2. Saturation: POST orders from ``CLIENTS`` concurrent httpx clients for ``seconds``;
   the rate is emails accepted by the sink per second once steady (sink count over time).
3. Latency at half the saturation rate, open loop: POST at a fixed rate, each order's
   ``created_at`` (or the client's send time) against the time the sink accepted its email
   (the sink's delivery time for that order id); p50 and p99.
4. Targets: ≥ 1,000 orders/s on 2 cores; p99 order → email ≤ 50 ms at half saturation.
"""

from __future__ import annotations

from bench.common import Figure

CASE = "end to end"
CLIENTS = 32


async def run(url: str, *, seconds: float) -> list[Figure]:
    """Not implemented yet: see the module docstring."""
    raise NotImplementedError("case 3 (end to end) is pending the Order and Email services")
