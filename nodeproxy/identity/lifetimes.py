"""Certificate lifetimes of the CA, in a module of their own so that the config (imported by every
nodeproxy process) does not load the CA's cryptography to know its defaults."""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "BACKDATE",
    "DEFAULT_INTERMEDIATE_TTL",
    "DEFAULT_NODE_CREDENTIAL_TTL",
    "DEFAULT_ROOT_TTL",
    "DEFAULT_SVID_TTL",
    "MIN_SVID_TTL",
]

# SVIDs: 24 h, as Istio and ztunnel issue them, renewed at half life (certmanager). Node credentials
# (what a node proxy shows the CA service) last longer: they are renewed the same way, but a node that
# was down for a while must still be able to reach the CA when it comes back.
DEFAULT_SVID_TTL = timedelta(hours=24)
DEFAULT_NODE_CREDENTIAL_TTL = timedelta(days=30)
DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=365)
# notBefore is set this far in the past so that a peer whose clock lags a little accepts a fresh SVID.
BACKDATE = timedelta(minutes=1)
# The shortest SVID the CA issues: anything shorter would be renewed in a busy loop.
MIN_SVID_TTL = timedelta(minutes=1)
