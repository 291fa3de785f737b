"""Alembic migrations of the Order Service's schema, applied by ``Database.migrate()``."""
