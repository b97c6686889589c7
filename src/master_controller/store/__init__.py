"""Persistence: SQLAlchemy models, Alembic migrations, and the queries the controller makes.

SQLite in the data dir by default; PostgreSQL by URL. Migrations run at start-up.
"""
