"""``orderflow email worker`` (the Email Service) and ``orderflow mail sink`` (the SMTP sink)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from orderflow.bus import redact_url
from orderflow.cli.common import (
    CommandError,
    UsageError,
    load_settings,
    redis_client,
    stop_on_signals,
)
from orderflow.config import DEFAULT_SINK_PORT, SMTP_URL_FILE, resolve_smtp_url

#: SMTP connections one worker keeps at most; more rarely helps a single server.
MAX_SMTP_POOL = 16


def register(commands: Any) -> None:
    """Add the ``email`` and ``mail`` command groups."""
    email = commands.add_parser("email", help="the Email Service")
    email_sub = email.add_subparsers(dest="email_command", metavar="ACTION", required=True)
    worker = email_sub.add_parser(
        "worker", help="consume orders and send each confirmation email once"
    )
    worker.add_argument("--name", help="consumer name in the group (default: host-pid-random)")
    worker.add_argument(
        "--concurrency", type=int, default=32, help="emails in flight at once (default: 32)"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (default: off)",
    )
    worker.set_defaults(handler=worker_command)

    mail = commands.add_parser("mail", help="the embedded SMTP sink")
    mail_sub = mail.add_subparsers(dest="mail_command", metavar="ACTION", required=True)
    sink = mail_sub.add_parser("sink", help="receive emails into the Maildir <data dir>/mail")
    sink.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    sink.add_argument("--port", type=int, default=None, help="port to listen on (8025)")
    sink.set_defaults(handler=sink_command)


def serve_metrics(port: int) -> None:
    """Serve this process's Prometheus metrics on loopback, from a daemon thread."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr="127.0.0.1")
    except OSError as exc:
        raise CommandError(f"cannot serve metrics on 127.0.0.1:{port}: {exc}") from None


def _quiet_aiosmtpd() -> None:
    # aiosmtpd logs every connection at INFO; at thousands of emails a second that
    # drowns everything else.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


async def worker_command(args: argparse.Namespace) -> int:
    """Run one Email Service worker until SIGINT or SIGTERM."""
    from orderflow.email import EmailService, SmtpSender
    from orderflow.email.render import parse_mail_from

    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.name is not None and (not args.name or any(ch.isspace() for ch in args.name)):
        raise UsageError(f"--name {args.name!r} must be non-empty, without spaces")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise UsageError(f"--metrics-port must be between 1 and 65535, got {args.metrics_port}")
    settings = load_settings()
    # Configuration errors first, before anything connects.
    parse_mail_from(settings.mail_from)
    if args.metrics_port is not None:
        serve_metrics(args.metrics_port)
    smtp_url = resolve_smtp_url(settings)
    sender = SmtpSender(
        smtp_url,
        pool_size=min(args.concurrency, MAX_SMTP_POOL),
        adaptive=settings.smtp_concurrency == "adaptive",
        # A send keeps its place until recorded: as many as the worker has on the go.
        max_in_flight=args.concurrency,
    )
    stop = asyncio.Event()
    stop_on_signals(stop)
    try:
        # A worker started before Redis (a reboot, a restarted container) waits for it.
        async with redis_client(settings, wait_unless=stop) as client:
            if stop.is_set():
                return 0
            service = EmailService(
                settings, client, sender, concurrency=args.concurrency, consumer=args.name
            )
            task = asyncio.create_task(service.run())
            await service.wait_started()
            print(
                f"📧 email worker {service.consumer} consuming '{settings.stream}' "
                f"(group '{settings.group}'), sending via {redact_url(smtp_url)}",
                flush=True,
            )
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            service.stop()
            stopper.cancel()
            stats = await task
            print(
                f"email worker {service.consumer} stopped: {stats.handled} handled, "
                f"{stats.dead_lettered} dead-lettered",
                flush=True,
            )
    finally:
        await sender.close()
    return 0


async def sink_command(args: argparse.Namespace) -> int:
    """Run the SMTP sink on the data dir's Maildir until SIGINT or SIGTERM."""
    from orderflow.embedded.smtp_sink import SmtpSink

    port = DEFAULT_SINK_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    _quiet_aiosmtpd()
    settings = load_settings()
    sink = SmtpSink(settings.mail_dir, host=args.host, port=port)
    try:
        await sink.start()
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{port}: {exc}") from None
    # Workers started without ORDERFLOW_SMTP_URL find the sink through this file.
    url_file = settings.data_dir / SMTP_URL_FILE
    url_file.write_text(sink.url + "\n")
    try:
        print(
            f"📬 SMTP sink listening on {sink.url}, delivering into {settings.mail_dir}",
            flush=True,
        )
        stop = asyncio.Event()
        stop_on_signals(stop)
        await stop.wait()
    finally:
        await sink.stop()
        with contextlib.suppress(OSError):
            if url_file.read_text().strip() == sink.url:
                url_file.unlink()
    print(f"SMTP sink stopped after {sink.delivered} messages", flush=True)
    return 0
