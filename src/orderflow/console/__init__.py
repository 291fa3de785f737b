"""The web console of the Order Service, served at ``/``: place orders, watch events
flow, read the inbox, steer dead letters.

Server-rendered pages (Jinja2, autoescaped), one small script and a style sheet
served from this package, and live updates by Server-Sent Events fed from Redis
Pub/Sub. ``console_router(settings)`` builds it; ``orderflow.app.create_app`` includes it.
"""

from orderflow.console.router import console_router

__all__ = ["console_router"]
