"""Optional extras: the libraries a light install (``pip install tmb``) leaves out.

An auditor needs none of them: ``tmb audit``, ``tmb verify-verdict``, ``tmb commit`` and ``tmb serve`` with
SQLite run on the base install. A feature that needs one calls :func:`require` before importing it, so a
missing extra is one line naming the ``pip install`` to run (a :class:`MissingExtraError`, exit 2), never
an ``ImportError`` traceback.

========== ===================================== =============================================
extra      packages (import names)               used by
========== ===================================== =============================================
``probe``  tpm2-pytss, nvidia-ml-py              ``tmb-probe``, ``tmb telemetry record`` (NVML),
           (``tpm2_pytss``, ``pynvml``)          ``tmb demo``
``pg``     psycopg (``psycopg``)                 ``[store] url`` (verdicts in PostgreSQL)
``report`` matplotlib (``matplotlib``)           ``tmb audit --html`` (a bundle's telemetry
                                                 section, ``tmb fingerprint evaluate --png``
``all``    all of the above                      what ``make venv`` installs (with ``dev``)
========== ===================================== =============================================
"""

from __future__ import annotations

import importlib

from tmb.errors import TmbError

EXTRAS: dict[str, tuple[str, ...]] = {
    "probe": ("tpm2_pytss", "pynvml"),
    "pg": ("psycopg",),
    "report": ("matplotlib",),
}


class MissingExtraError(TmbError):
    """A feature's optional libraries are not installed; the message names the extra to install."""


def require(extra: str, feature: str, *, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtraError` unless ``extra``'s modules (or the given subset) import.

    ``feature`` says what needs them, e.g. ``"the HTML report"``. The modules are imported, not only
    looked up, so an installed but broken library (a missing shared object) is reported the same way.
    """
    for module in EXTRAS[extra] if modules is None else modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(
                f"{feature} needs `pip install 'tmb[{extra}]'`",
                missing=module,
                error=f"{type(exc).__name__}: {exc}",
                hint=f"install the optional extra: pip install 'tmb[{extra}]' (or 'tmb[all]')",
            ) from None
