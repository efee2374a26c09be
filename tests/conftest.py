"""Shared pytest fixtures. The swtpm fixtures live in tests/swtpm.py, the PostgreSQL ones in tests/pg.py (see
their docstrings)."""

from pg import pg_url, postgres
from swtpm import swtpm, swtpm_factory, tpm

__all__ = ["pg_url", "postgres", "swtpm", "swtpm_factory", "tpm"]
