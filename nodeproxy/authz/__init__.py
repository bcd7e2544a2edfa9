"""Workload authentication and authorization: peer authentication modes (STRICT / PERMISSIVE), JWT
request authentication, and ALLOW / DENY authorization policies (docs/authorization.md).

Entry point: :func:`nodeproxy.authz.engine.compile_authz`.
"""
