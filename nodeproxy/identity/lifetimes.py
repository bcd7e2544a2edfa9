"""Certificate lifetimes of the CA, in a module of their own so that the config (imported by every
nodeproxy process) does not load the CA's cryptography to know its defaults."""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = [
    "BACKDATE",
    "DEFAULT_INTERMEDIATE_TTL",
    "DEFAULT_NODE_CREDENTIAL_TTL",
    "DEFAULT_ROOT_TTL",
    "DEFAULT_SVID_TTL",
    "MIN_SVID_TTL",
    "issuance_time",
    "renewal_point",
]

# SVIDs: 24 h, as Istio and ztunnel issue them, renewed at half life (certmanager). Node credentials
# (what a node proxy shows the CA service) last longer: they are renewed the same way, but a node that
# was down for a while must still be able to reach the CA when it comes back.
DEFAULT_SVID_TTL = timedelta(hours=24)
DEFAULT_NODE_CREDENTIAL_TTL = timedelta(days=30)
DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=365)
# notBefore is set this far in the past so that a peer whose clock lags a little accepts a fresh SVID.
# It is no part of the lifetime asked for: renewal is measured from issuance (renewal_point).
BACKDATE = timedelta(minutes=1)
# The shortest SVID the CA issues: anything shorter would be renewed in a busy loop.
MIN_SVID_TTL = timedelta(minutes=1)


def issuance_time(not_before: datetime, *, seen_at: datetime) -> datetime:
    """When this CA issued a certificate whose notBefore is ``not_before`` (it backdates by BACKDATE),
    for a certificate whose arrival was not seen (one loaded from a file). Never later than ``seen_at``,
    when it was read (a CA that backdates less), nor earlier than notBefore."""
    return max(not_before, min(not_before + BACKDATE, seen_at))


def renewal_point(issued_at: datetime, not_after: datetime, fraction: float) -> datetime:
    """The time ``fraction`` of the lifetime ``issued_at``..``not_after`` has passed.

    The lifetime starts at issuance, not at the backdated notBefore: measured from notBefore, half of a
    1 h SVID would pass 30 s early and half of a 1 min SVID (MIN_SVID_TTL) as soon as it arrives.
    A certificate that ends before ``issued_at`` (a file holding an expired one) is due at once."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a renewal fraction must be in (0, 1), not {fraction}")
    return issued_at + max(not_after - issued_at, timedelta(0)) * fraction
