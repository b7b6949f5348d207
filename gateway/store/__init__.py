"""Persistence (SQLAlchemy): SQLite by default, PostgreSQL by URL; schema migrations at start-up."""
