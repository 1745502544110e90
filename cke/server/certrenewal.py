"""The certificate-renewal decision: certificate times, the trust to hold, and now -> what
to renew, and why.

Pure, like the rest of the decision: the clock is ``PKIStatus.now`` (the collection's
time). A leaf is renewed when it is missing, when no more than ``renew_fraction`` of
its lifetime is left, or when it comes from another issuer than the one its CA issues
with now (a CA rotation). A trust bundle on the node that differs from the wanted one
makes the member *outdated* instead (etcd reads its trusted CA files only at start; see
the README), which the strategy's restart step handles under the quorum rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cke.certinfo import CertInfo
from cke.server.clusterstatus import NodeStatus, PKIStatus

# Reported when a due certificate cannot be renewed (node unreachable, Vault down).
RULE_CERTIFICATES_RENEWED = "certificates-renewed"

# The leaf certificates cke writes on each etcd member: name -> CA name.
ETCD_LEAVES: Mapping[str, str] = {"server": "server", "peer": "etcd-peer"}
# The trust bundles on each member: file stem -> CA name.
ETCD_TRUST: Mapping[str, str] = {"ca-client": "etcd-client", "ca-peer": "etcd-peer"}


@dataclass(frozen=True)
class Due:
    """One certificate that must be renewed now."""

    node: str
    name: str  # "server", "peer", or cke's own "etcd-root-client"
    reason: str
    not_after: float | None  # None: missing

    def describe(self) -> str:
        return f"{self.node} {self.name}: {self.reason}"


def renew_at(cert: CertInfo, renew_fraction: float) -> float:
    """The time from which ``cert`` is inside its renewal window."""
    return cert.not_after - cert.lifetime * renew_fraction


def renewal_reason(
    cert: CertInfo | None, now: float, renew_fraction: float, issuer_key_id: str = ""
) -> str | None:
    """Why ``cert`` must be renewed at ``now`` (None: it need not be)."""
    if cert is None:
        return "missing or unreadable"
    if cert.not_after <= now:
        return f"expired {_ago(now - cert.not_after)} ago"
    if now >= renew_at(cert, renew_fraction):
        return (
            f"expires in {_ago(cert.not_after - now)}, inside its renewal window "
            f"(the last {renew_fraction:.0%} of {_ago(cert.lifetime)})"
        )
    if issuer_key_id and cert.issuer_key_id != issuer_key_id:
        return "issued by another CA than the current one (CA rotation)"
    return None


def node_renewals(ns: NodeStatus, pki: PKIStatus) -> list[Due]:
    """The leaves on one etcd member that must be renewed now, in name order."""
    if pki.now <= 0:
        return []
    due = []
    for name, ca in sorted(ETCD_LEAVES.items()):
        cert = ns.certs.get(name)
        issuer = pki.trust.issuers.get(ca, "")
        reason = renewal_reason(cert, pki.now, pki.renew_fraction, issuer)
        if reason is not None:
            due.append(Due(ns.address, name, reason, cert.not_after if cert else None))
    return due


def first_expiry(ns: NodeStatus) -> tuple[str, CertInfo] | None:
    """The node's leaf that expires first (``ckecli status``)."""
    if not ns.certs:
        return None
    return min(ns.certs.items(), key=lambda item: (item[1].not_after, item[0]))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
