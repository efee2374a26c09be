"""The daemon: what ``tmb serve`` runs beside the proxy, one module a job.

``api``      the route table and the public read routes (verdicts, keys, evidence references)
``metrics``  the Prometheus registry, ``GET /metrics`` and ``GET /healthz``
``admin``    the worker, prune and profile routes, all behind one bearer guard (:func:`admin.admin_only`)
``openapi``  the OpenAPI document served at ``GET /openapi.json``

Errors are the shared envelope of :mod:`tmb.envelope`. Import from the modules; this package imports nothing.
"""
