"""Errors raised by the verity subsystem; every one is a :class:`~tmb.errors.TmbError`."""

from __future__ import annotations

from tmb.errors import InputError, TmbError


class VerityError(TmbError):
    """The hash tree could not be built or read (I/O failure, bad parameters)."""


class VerityInputError(InputError):
    """A data or hash file, or a parameter such as the salt, is unusable; context names the path."""


class ModelTreeError(InputError):
    """A model directory cannot be turned into a reproducible image (symlink escaping it, special file...)."""


class CommitmentError(InputError):
    """A commitment file is missing, corrupt, of another format version, or inconsistent."""


class ToolError(TmbError):
    """An external tool (``mkfs.erofs``) is missing or failed."""
