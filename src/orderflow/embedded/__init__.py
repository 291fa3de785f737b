"""Servers orderflow runs itself when the user configured none: Redis and an SMTP sink."""
