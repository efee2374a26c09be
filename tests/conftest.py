"""Shared pytest fixtures. The swtpm fixtures live in tests/swtpm.py (see its docstring)."""

from swtpm import swtpm, swtpm_factory, tpm

__all__ = ["swtpm", "swtpm_factory", "tpm"]
