"""tmb: runtime telemetry attestation for AI inference providers.

The stable surface for auditors and integrators lives in the subpackages' ``__init__`` modules
(``tmb.attest``, ``tmb.verity``, ...); everything else is an implementation detail.
"""

__version__ = "0.1.0"
