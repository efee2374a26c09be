"""Sample infrastructure for the demo and tests: a software TPM launcher (``swtpm``), OpenAI-compatible
inference workers with a small deterministic text model of our own (``worker``, ``model``; an impostor is a
worker that behaves as another model than it claims), a round-robin load balancer (``load_balancer``) and a
client that fetches and verifies verdicts (``client``). See docs/sample-infra.md."""
