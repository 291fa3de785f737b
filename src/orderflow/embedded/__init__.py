"""Servers orderflow runs itself when the user configured none: Redis and an SMTP sink.

Development and test servers: of orderflow's own code only the CLI, which starts
them, imports this package. ``redis_server`` (a private redis-server process),
``smtp_server`` (a general aiosmtpd server), ``smtp_sink`` (the sink: its SMTP in
``smtp_session``, its Maildir writer in ``maildir_writer``).
"""
