"""Sample infrastructure for the demo and tests: a software TPM launcher, and (later) a load balancer,
inference workers, an impostor worker and a client."""
