"""The optional C extension of the IMA replay's hot loops; everything else is in pyproject.toml.

``optional=True``: where it cannot build (no compiler, no OpenSSL or Python headers) the install goes on
and tmb uses its Python loops (tmb/attest/pcr.py). The Makefile's ``deps`` installs what it needs.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tmb.attest._imafast",
            sources=["tmb/attest/_imafast.c"],
            libraries=["crypto"],
            optional=True,
        )
    ]
)
