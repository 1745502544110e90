"""Certificate renewal and CA rotation: the pure parts.

The renewal window (``cke/server/certrenewal.py``), the decision's renewal and restart
steps with trust bundles (``cke/server/strategy.py``), the CA rotation stages
(``cke/server/carotation.py``), what the status script prints and how it is read
(``cke/server/collect.py``), and what happens while Vault is away
(``cke/server/control.py``). Real certificates come from a small EC P-256 CA below.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from cke.certinfo import CertInfo, bundle_key_ids, join_bundle, parse_certificate
from cke.cluster import Cluster
from cke.op.etcd import (
    ETCD_CONF_DIR,
    EtcdRenewCertsOp,
    EtcdRestartOp,
    StartEtcd,
    desired_etcd_digest,
)
from cke.server.carotation import (
    DROP_OLD,
    REISSUE,
    REQUESTED,
    TRUST_BOTH,
    CARotationOp,
    Progress,
    RotationError,
    RotationRecord,
    parse_rotation,
    rotation_progress,
    trust_of,
)
from cke.server.certrenewal import (
    RULE_CERTIFICATES_RENEWED,
    Due,
    node_renewals,
    renewal_reason,
)
from cke.server.clusterstatus import EtcdStatus, NodeStatus, PKIStatus, Trust
from cke.server.collect import _cert_files_sh, parse_cert_lines
from cke.server.control import RULE_VAULT_AVAILABLE, certificate_summary, held_for_vault
from cke.server.phases import Phase
from cke.server.strategy import ETCD_MAINTAIN_ABORTED, ClusterStatus, Decision
from tests.unit.etcd_builders import member
from tests.unit.test_strategy import (
    A,
    B,
    C,
    D,
    clean,
    cluster,
    healthy,
    node_of,
    only,
    rules,
    run,
    running,
    status,
    with_member,
    with_node,
)

pytestmark = pytest.mark.unit

DAY = 86400.0
NOW = 1_800_000_000.0  # the collection's clock (2027-01-15)
LIFETIME = 360 * DAY
FRACTION = 0.25  # exact in binary: the window boundary below is exact too


# ---------------------------------------------------------------------------
# Real certificates: a small EC P-256 CA
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(Encoding.PEM).decode()

    @property
    def key_id(self) -> str:
        return bundle_key_ids(self.pem)[0]


def _time(unix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix, dt.UTC)


def make_ca(common_name: str) -> LocalCA:
    """A self-signed CA with a Subject Key Identifier."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_time(NOW - DAY))
        .not_valid_after(_time(NOW + 3650 * DAY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return LocalCA(key, cert)


def make_leaf(ca: LocalCA, common_name: str, not_before: float, not_after: float) -> str:
    """A leaf signed by ``ca`` with its Authority Key Identifier, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_time(not_before))
        .not_valid_after(_time(not_after))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM).decode()


# Both CAs carry the same name: only the key ids tell them apart.
OLD_CA = make_ca("cke etcd peer CA")
NEW_CA = make_ca("cke etcd peer CA")
OLD_ID = OLD_CA.key_id
NEW_ID = NEW_CA.key_id
BOTH = join_bundle(OLD_CA.pem, NEW_CA.pem)


def cert(remaining: float = LIFETIME, lifetime: float = LIFETIME, issuer: str = OLD_ID) -> CertInfo:
    """A leaf that has ``remaining`` seconds left at NOW."""
    not_after = NOW + remaining
    return CertInfo("1", not_after - lifetime, not_after, issuer)


FRESH = cert()
DUE = cert(remaining=LIFETIME * FRACTION - 60)  # a minute inside its window


def fresh_certs(issuer: str = OLD_ID) -> dict[str, CertInfo]:
    return {"server": cert(issuer=issuer), "peer": cert(issuer=issuer)}


def pki(issuers: dict[str, str] | None = None, now: float = NOW) -> PKIStatus:
    return PKIStatus(now=now, renew_fraction=FRACTION, trust=Trust(issuers=issuers or {}))


def with_pki(s: ClusterStatus, p: PKIStatus) -> ClusterStatus:
    return dataclasses.replace(s, pki=p)


def with_certs(s: ClusterStatus, address: str, **certs: CertInfo) -> ClusterStatus:
    ns = s.nodes[address]
    return with_node(s, dataclasses.replace(ns, certs={**ns.certs, **certs}))


def healthy_with_certs(c: Cluster, addresses: Sequence[str]) -> ClusterStatus:
    """``healthy`` whose members hold fresh leaves, at NOW."""
    s = with_pki(healthy(c, addresses), pki())
    for a in addresses:
        s = with_certs(s, a, **fresh_certs())
    return s


# ---------------------------------------------------------------------------
# 1. The renewal window
# ---------------------------------------------------------------------------

BOUNDARY = LIFETIME * FRACTION  # remaining time at which the window opens


@pytest.mark.parametrize(
    ("peer", "issuers", "reason"),
    [
        pytest.param(None, {}, "missing or unreadable", id="missing"),
        pytest.param(FRESH, {}, None, id="fresh"),
        pytest.param(cert(remaining=BOUNDARY + 1), {}, None, id="one-second-before-window"),
        pytest.param(cert(remaining=BOUNDARY), {}, "inside its renewal window", id="at-boundary"),
        pytest.param(DUE, {}, "inside its renewal window", id="inside-window"),
        pytest.param(cert(remaining=-3600), {}, "expired 60m ago", id="expired"),
        pytest.param(cert(remaining=0), {}, "expired 0s ago", id="expires-now"),
        pytest.param(
            FRESH, {"etcd-peer": NEW_ID}, "issued by another CA", id="old-issuer-in-rotation"
        ),
        pytest.param(cert(issuer=NEW_ID), {"etcd-peer": NEW_ID}, None, id="new-issuer"),
        # The server CA rotates on its own: a peer leaf is not judged by its issuer.
        pytest.param(FRESH, {"server": NEW_ID}, None, id="other-ca-rotating"),
    ],
)
def test_node_renewals_table(
    peer: CertInfo | None, issuers: dict[str, str], reason: str | None
) -> None:
    certs = {"server": cert(issuer=issuers.get("server", OLD_ID))}
    if peer is not None:
        certs["peer"] = peer
    ns = NodeStatus(A, ssh_ok=True, etcd_running=True, certs=certs)
    due = node_renewals(ns, pki(issuers))
    if reason is None:
        assert due == []
        assert renewal_reason(peer, NOW, FRACTION, issuers.get("etcd-peer", "")) is None
        return
    assert len(due) == 1, due
    (d,) = due
    assert (d.node, d.name) == (A, "peer")
    assert reason in d.reason, d.reason
    assert d.not_after == (peer.not_after if peer else None)
    assert d.describe().startswith(f"{A} peer: ")


def test_both_leaves_due_are_listed_in_name_order() -> None:
    ns = NodeStatus(A, ssh_ok=True, etcd_running=True, certs={"server": DUE, "peer": DUE})
    assert [d.name for d in node_renewals(ns, pki())] == ["peer", "server"]


def test_unknown_clock_renews_nothing() -> None:
    # PKIStatus.now == 0: no collection time, so not even a missing leaf is renewed.
    expired = cert(remaining=-LIFETIME)
    ns = NodeStatus(A, ssh_ok=True, etcd_running=True, certs={"server": expired})
    assert node_renewals(ns, pki({"etcd-peer": NEW_ID}, now=0.0)) == []
    assert node_renewals(ns, pki({"etcd-peer": NEW_ID})) != []


# X.509 times are whole seconds; the clock is a float.
_TIMES = st.integers(min_value=0, max_value=4_000_000_000)
_FRACTIONS = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    not_before=_TIMES,
    lifetime=st.integers(min_value=1, max_value=20 * 365 * 86400),
    now=st.floats(min_value=0.0, max_value=4_100_000_000.0, allow_nan=False),
    fraction=_FRACTIONS,
    issuer=st.sampled_from(["", OLD_ID, NEW_ID]),
)
def test_due_iff_inside_window_or_other_issuer(
    not_before: int, lifetime: int, now: float, fraction: float, issuer: str
) -> None:
    not_after = float(not_before + lifetime)
    c = CertInfo("1", float(not_before), not_after, OLD_ID)
    window_open = now >= not_after - (not_after - not_before) * fraction
    other_issuer = issuer != "" and issuer != OLD_ID
    reason = renewal_reason(c, now, fraction, issuer)
    assert (reason is not None) == (window_open or other_issuer), reason


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    now=st.integers(min_value=1, max_value=4_000_000_000),
    lifetime=st.integers(min_value=60, max_value=20 * 365 * 86400),
    # 1 - fraction >= 1e-6: a window that leaves at least some microseconds of a
    # one-minute lifetime (closer to 1 the float subtraction rounds to ``now``).
    fraction=st.floats(min_value=0.0, max_value=1 - 1e-6, exclude_min=True),
    issuer=st.sampled_from(["", NEW_ID]),
)
def test_renewed_certificate_is_not_due_at_once(
    now: int, lifetime: int, fraction: float, issuer: str
) -> None:
    renewed = CertInfo("2", float(now), float(now + lifetime), issuer or OLD_ID)
    assert renewal_reason(renewed, float(now), fraction, issuer) is None
    ns = NodeStatus(A, ssh_ok=True, certs={"server": renewed, "peer": renewed})
    p = PKIStatus(
        now=float(now),
        renew_fraction=fraction,
        trust=Trust(issuers={"server": issuer, "etcd-peer": issuer}),
    )
    assert node_renewals(ns, p) == []


# ---------------------------------------------------------------------------
# 2. The decision: renew in place
# ---------------------------------------------------------------------------


def test_fresh_certificates_completed() -> None:
    c = cluster([A, B, C])
    assert run(c, healthy_with_certs(c, [A, B, C])) == Decision([], Phase.COMPLETED)


def test_one_due_peer_certificate_is_renewed() -> None:
    c = cluster([A, B, C])
    s = with_certs(healthy_with_certs(c, [A, B, C]), B, peer=DUE)
    d = run(c, s)
    op = only(d, EtcdRenewCertsOp, [B])
    assert d.phase is Phase.ETCD_MAINTAIN and d.blocked == []
    assert isinstance(op, EtcdRenewCertsOp)
    assert [n.address for n in op.nodes] == [B]
    assert list(op.reasons) == [B] and len(op.reasons[B]) == 1
    assert op.reasons[B][0].startswith("peer expires in")


def test_renewal_runs_while_a_membership_change_is_blocked() -> None:
    # D waits to be added but is unreachable: membership is blocked, renewal is not.
    c = cluster([A, B, C, D])
    s = with_node(healthy_with_certs(c, [A, B, C]), clean(D, ssh_ok=False))
    blocked = run(c, s)
    assert blocked.operators == [] and blocked.phase is ETCD_MAINTAIN_ABORTED
    assert rules(blocked) == {"all-control-planes-reachable": (D,)}

    d = run(c, with_certs(s, C, peer=DUE))
    only(d, EtcdRenewCertsOp, [C])
    assert d.phase is Phase.ETCD_MAINTAIN


def test_unreachable_due_member_is_reported_not_renewed() -> None:
    c = cluster([A, B, C])
    s = with_certs(healthy_with_certs(c, [A, B, C]), C, peer=DUE)
    s = with_node(s, dataclasses.replace(s.nodes[C], ssh_ok=False))
    d = run(c, s)
    assert d.operators == []
    assert d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {RULE_CERTIFICATES_RENEWED: (C,)}
    (b,) = d.blocked
    assert f"{C} peer: expires in" in b.message

    # With another due member that can be reached: that one is renewed, C reported.
    d2 = run(c, with_certs(s, A, server=DUE))
    op = only(d2, EtcdRenewCertsOp, [A])
    assert isinstance(op, EtcdRenewCertsOp) and list(op.reasons) == [A]
    assert rules(d2) == {RULE_CERTIFICATES_RENEWED: (C,)}


def test_renewal_without_an_etcd_leader() -> None:
    # Expired peer certificates are what keeps the members from electing a leader.
    c = cluster([A, B, C])
    expired = cert(remaining=-DAY)
    s = status(
        [member(a, healthy=False) for a in (A, B, C)],
        [running(c, a, certs={"server": FRESH, "peer": expired}) for a in (A, B, C)],
    )
    s = with_pki(s, pki())
    assert s.etcd.leader is None
    d = run(c, s)
    op = only(d, EtcdRenewCertsOp, [A, B, C])
    assert d.phase is Phase.ETCD_MAINTAIN
    assert isinstance(op, EtcdRenewCertsOp)
    assert all(r == ["peer expired 24.0h ago"] for r in op.reasons.values()), op.reasons


def test_renewal_when_expired_certificates_make_etcd_unreachable() -> None:
    # The server and peer leaves are issued together with the same TTL: when the peer
    # leaves expired, the server leaves did too, and cke's own TLS client refuses every
    # member, so the collector sees no etcd at all (EtcdStatus(reachable=False)). The
    # members still run with their data; renewing in place is what brings etcd back.
    c = cluster([A, B, C])
    expired = cert(remaining=-DAY)
    s = status([], [running(c, a, certs={"server": expired, "peer": expired}) for a in (A, B, C)])
    s = with_pki(s, pki())
    assert s.etcd == EtcdStatus(reachable=False)
    d = run(c, s)
    only(d, EtcdRenewCertsOp, [A, B, C])
    assert d.phase is Phase.ETCD_MAINTAIN


# ---------------------------------------------------------------------------
# 3. Trust bundles are part of the spec
# ---------------------------------------------------------------------------

TRUST = Trust(bundles={"etcd-peer": BOTH, "etcd-client": NEW_CA.pem, "server": OLD_CA.pem})


def test_trust_bundles_make_members_outdated_one_at_a_time_leader_last() -> None:
    c = cluster([A, B, C])
    # healthy() runs every member with the digest of a spec without trust bundles; A leads.
    s = with_pki(healthy(c, [A, B, C]), PKIStatus(trust=TRUST))

    def current(s: ClusterStatus, a: str) -> ClusterStatus:
        return with_node(s, running(c, a, etcd_digest=desired_etcd_digest(node_of(c, a), c, TRUST)))

    op = only(run(c, s), EtcdRestartOp, [B])
    assert isinstance(op, EtcdRestartOp) and op.move_leader_to is None
    starts = [step for step in iter(op.next_command, None) if isinstance(step, StartEtcd)]
    assert [start.trust for start in starts] == [TRUST]

    s = current(s, B)
    op = only(run(c, s), EtcdRestartOp, [C])
    s = current(s, C)
    op = only(run(c, s), EtcdRestartOp, [A])
    assert isinstance(op, EtcdRestartOp)
    assert op.move_leader_to is not None and op.move_leader_to.address == B

    s = current(s, A)
    assert run(c, s) == Decision([], Phase.COMPLETED)


def test_trust_changes_the_digest() -> None:
    c = cluster([A])
    n = node_of(c, A)
    plain = desired_etcd_digest(n, c)
    assert desired_etcd_digest(n, c, Trust()) == plain
    assert desired_etcd_digest(n, c, TRUST) != plain
    other = Trust(bundles={**TRUST.bundles, "etcd-peer": NEW_CA.pem})
    assert desired_etcd_digest(n, c, other) != desired_etcd_digest(n, c, TRUST)


# ---------------------------------------------------------------------------
# 4. CA rotation
# ---------------------------------------------------------------------------


def record(stage: str, **fields: str) -> RotationRecord:
    data = {"stage": stage, "requested": "2027-01-15T00:00:00Z", "issuer-name": "rotated"}
    if stage != REQUESTED:
        data |= {"old": OLD_CA.pem, "new": NEW_CA.pem, "new-issuer-id": "abc"}
    return RotationRecord.model_validate({**data, **fields})


@pytest.mark.parametrize(
    ("stage", "bundle_ids", "issuer"),
    [
        (None, (OLD_ID,), ""),
        (REQUESTED, (OLD_ID,), ""),
        (TRUST_BOTH, (OLD_ID, NEW_ID), ""),
        (REISSUE, (OLD_ID, NEW_ID), NEW_ID),
        (DROP_OLD, (NEW_ID,), NEW_ID),
    ],
)
def test_trust_of_each_stage(stage: str | None, bundle_ids: tuple[str, ...], issuer: str) -> None:
    t = trust_of(OLD_CA.pem, record(stage) if stage else None)
    assert bundle_key_ids(t.bundle) == bundle_ids
    assert t.issuer_key_id == issuer


def test_parse_rotation_accepts_what_the_leader_writes() -> None:
    for stage in (REQUESTED, TRUST_BOTH, REISSUE, DROP_OLD):
        r = record(stage)
        assert parse_rotation("etcd-peer", r.to_json().encode()) == r


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("kubernetes", record(REQUESTED).to_json().encode(), "is not a CA cke rotates"),
        ("server", record(REQUESTED).to_json().replace("requested", "bogus", 1).encode(), "stage"),
        ("etcd-peer", record(TRUST_BOTH, old="SECRET-NOT-PEM").to_json().encode(), "old/new"),
        ("etcd-client", record(DROP_OLD, new="SECRET-NOT-PEM").to_json().encode(), "old/new"),
        ("etcd-peer", b'{"stage": "requ', "Invalid JSON"),
        ("etcd-peer", None, "Invalid JSON"),
    ],
)
def test_parse_rotation_refuses(name: str, raw: bytes | None, says: str) -> None:
    with pytest.raises(RotationError) as info:
        parse_rotation(name, raw)
    message = str(info.value)
    assert message.startswith(f"ca-rotation/{name}: "), message
    assert says in message
    assert "\n" not in message
    assert "SECRET" not in message  # stored values are never echoed


def trusting(address: str, *ids: str, stem: str = "ca-peer") -> NodeStatus:
    return NodeStatus(address, ssh_ok=True, etcd_running=True, trusted={stem: ids})


def always(_: NodeStatus) -> bool:
    return True


def except_for(address: str) -> Callable[[NodeStatus], bool]:
    return lambda ns: ns.address != address


@pytest.mark.parametrize(("name", "stem"), [("etcd-peer", "ca-peer"), ("etcd-client", "ca-client")])
def test_progress_trust_both_waits_for_bundle_and_restart(name: str, stem: str) -> None:
    p = PKIStatus(now=NOW, trust=Trust(bundles={name: BOTH}))
    both = [trusting(a, OLD_ID, NEW_ID, stem=stem) for a in (A, B, C)]
    assert rotation_progress(name, TRUST_BOTH, p, both, always) == Progress(
        name, TRUST_BOTH, True, ""
    )

    # B still trusts the old CA only.
    behind = [*both[:1], trusting(B, OLD_ID, stem=stem), both[2]]
    got = rotation_progress(name, TRUST_BOTH, p, behind, always)
    assert not got.ready and B in got.waiting_for and A not in got.waiting_for

    # C holds the new bundle but runs a spec from before it (not restarted yet).
    got = rotation_progress(name, TRUST_BOTH, p, both, except_for(C))
    assert not got.ready and C in got.waiting_for and A not in got.waiting_for


def test_progress_drop_old_wants_the_new_ca_only() -> None:
    p = PKIStatus(now=NOW, trust=Trust(bundles={"etcd-peer": NEW_CA.pem}))
    new_only = [trusting(a, NEW_ID) for a in (A, B, C)]
    assert rotation_progress("etcd-peer", DROP_OLD, p, new_only, always).ready
    still_both = [*new_only[:2], trusting(C, OLD_ID, NEW_ID)]
    got = rotation_progress("etcd-peer", DROP_OLD, p, still_both, always)
    assert not got.ready and C in got.waiting_for


def leaves(address: str, issuer: str) -> NodeStatus:
    return NodeStatus(address, ssh_ok=True, etcd_running=True, certs=fresh_certs(issuer))


def test_progress_reissue_waits_for_every_leaf_of_the_ca() -> None:
    p = PKIStatus(now=NOW, trust=Trust(issuers={"etcd-peer": NEW_ID}))
    renewed = [leaves(a, NEW_ID) for a in (A, B, C)]
    assert rotation_progress("etcd-peer", REISSUE, p, renewed, always).ready
    one_old = [*renewed[:1], leaves(B, OLD_ID), renewed[2]]
    got = rotation_progress("etcd-peer", REISSUE, p, one_old, always)
    assert not got.ready and B in got.waiting_for and A not in got.waiting_for
    missing = [*renewed[:2], NodeStatus(C, ssh_ok=True, etcd_running=True)]
    got = rotation_progress("etcd-peer", REISSUE, p, missing, always)
    assert not got.ready and C in got.waiting_for


def test_progress_reissue_of_client_ca_waits_for_ckes_own_certificate() -> None:
    # The members hold no client leaf: only cke's own client certificate counts.
    members = [leaves(a, OLD_ID) for a in (A, B, C)]
    trust = Trust(issuers={"etcd-client": NEW_ID})
    waiting = PKIStatus(now=NOW, trust=trust, own_client_issuer=OLD_ID)
    got = rotation_progress("etcd-client", REISSUE, waiting, members, always)
    assert not got.ready and "cke's own client certificate" in got.waiting_for
    unknown = dataclasses.replace(waiting, own_client_issuer="")
    assert not rotation_progress("etcd-client", REISSUE, unknown, members, always).ready
    done = dataclasses.replace(waiting, own_client_issuer=NEW_ID)
    assert rotation_progress("etcd-client", REISSUE, done, members, always).ready


PEER_TRUST_BOTH = PKIStatus(
    now=NOW,
    renew_fraction=FRACTION,
    trust=Trust(bundles={"etcd-peer": BOTH}),
    rotations={"etcd-peer": TRUST_BOTH},
)


def rotating(c: Cluster, p: PKIStatus, ids: tuple[str, ...]) -> ClusterStatus:
    """Members A (leader), B, C running the spec of ``p``'s trust and trusting ``ids``."""
    s = with_pki(healthy(c, [A, B, C]), p)
    for a in (A, B, C):
        digest = desired_etcd_digest(node_of(c, a), c, p.trust)
        s = with_node(
            s,
            running(c, a, etcd_digest=digest, certs=fresh_certs(), trusted={"ca-peer": ids}),
        )
    return s


def test_decide_advances_a_rotation_that_reached_every_member() -> None:
    c = cluster([A, B, C])
    s = rotating(c, PEER_TRUST_BOTH, (OLD_ID, NEW_ID))
    d = run(c, s)
    op = only(d, CARotationOp, ["etcd-peer"])
    assert isinstance(op, CARotationOp) and (op.ca, op.stage) == ("etcd-peer", TRUST_BOTH)
    assert d.phase is Phase.ETCD_MAINTAIN
    assert d.rotations == [Progress("etcd-peer", TRUST_BOTH, True, "")]


def test_decide_restarts_before_advancing_and_lists_progress() -> None:
    c = cluster([A, B, C])
    s = rotating(c, PEER_TRUST_BOTH, (OLD_ID, NEW_ID))
    s = with_node(s, running(c, B, certs=fresh_certs(), trusted={"ca-peer": (OLD_ID,)}))
    d = run(c, s)
    only(d, EtcdRestartOp, [B])
    (progress,) = d.rotations
    assert (progress.name, progress.stage, progress.ready) == ("etcd-peer", TRUST_BOTH, False)
    assert B in progress.waiting_for
    assert progress.to_dict() == {"stage": TRUST_BOTH, "waiting-for": progress.waiting_for}


def test_decide_does_not_advance_with_a_control_plane_unreachable() -> None:
    c = cluster([A, B, C, D])
    s = with_node(rotating(c, PEER_TRUST_BOTH, (OLD_ID, NEW_ID)), clean(D, ssh_ok=False))
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"all-control-planes-reachable": (D,)}
    assert d.rotations == [Progress("etcd-peer", TRUST_BOTH, True, "")]


def test_decide_does_not_advance_while_a_member_lags() -> None:
    c = cluster([A, B, C])
    s = with_member(rotating(c, PEER_TRUST_BOTH, (OLD_ID, NEW_ID)), member(C, raft_index=1))
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"cluster-healthy-and-in-sync": (C,)}


def test_decide_reissue_renews_old_leaves_then_advances() -> None:
    c = cluster([A, B, C])
    p = dataclasses.replace(
        PEER_TRUST_BOTH,
        trust=Trust(bundles={"etcd-peer": BOTH}, issuers={"etcd-peer": NEW_ID}),
        rotations={"etcd-peer": REISSUE},
    )
    s = rotating(c, p, (OLD_ID, NEW_ID))  # every leaf from the old CA
    d = run(c, s)
    op = only(d, EtcdRenewCertsOp, [A, B, C])
    assert isinstance(op, EtcdRenewCertsOp)
    assert all(
        r == ["peer issued by another CA than the current one (CA rotation)"]
        for r in op.reasons.values()
    ), op.reasons
    assert not d.rotations[0].ready

    for a in (A, B, C):
        s = with_certs(s, a, peer=cert(issuer=NEW_ID))
    d = run(c, s)
    op2 = only(d, CARotationOp, ["etcd-peer"])
    assert isinstance(op2, CARotationOp) and op2.stage == REISSUE


def test_no_rotation_no_progress() -> None:
    c = cluster([A, B, C])
    assert run(c, healthy_with_certs(c, [A, B, C])).rotations == []


# ---------------------------------------------------------------------------
# 5. What the status script prints, and how it is read
# ---------------------------------------------------------------------------

SERVER_PEM = make_leaf(OLD_CA, "10.0.0.1", NOW - DAY, NOW + 300 * DAY)
PEER_PEM = make_leaf(NEW_CA, "10.0.0.1", NOW - 2 * DAY, NOW + 200 * DAY)


def line(name: str, data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return b"cke-cert-" + name.encode() + b"=" + base64.b64encode(raw)


def test_parse_cert_lines_reads_leaves_and_bundles() -> None:
    output = b"\n".join(
        [
            b"etcd running digest=abc",
            line("server", SERVER_PEM),
            line("peer", PEER_PEM),
            line("ca-peer", BOTH),
            line("ca-client", NEW_CA.pem),
            b"cke-etcd-data=1",
        ]
    )
    certs, trusted = parse_cert_lines(output, A)
    assert certs == {"server": parse_certificate(SERVER_PEM), "peer": parse_certificate(PEER_PEM)}
    assert certs["server"].issuer_key_id == OLD_ID
    assert certs["peer"].issuer_key_id == NEW_ID
    assert certs["server"].not_after == NOW + 300 * DAY
    assert trusted == {"ca-peer": (OLD_ID, NEW_ID), "ca-client": (NEW_ID,)}


def test_parse_cert_lines_skips_what_it_cannot_read() -> None:
    output = b"\n".join(
        [
            b"cke-cert-server=!!!not-base64!!!",
            line("peer", "just some text, no certificate"),
            line("ca-peer", b"\x00\xff not a PEM bundle"),
            line("ca-client", NEW_CA.pem),
            b"cke-cert-server",  # no value at all
            b"cke-cert-peer=",
            line("peer.key", SERVER_PEM),  # not a file cke reads
        ]
    )
    certs, trusted = parse_cert_lines(output, A)
    assert certs == {}
    assert trusted == {"ca-client": (NEW_ID,)}


def test_status_script_and_parser_agree_and_read_no_key(tmp_path: Path) -> None:
    script = _cert_files_sh()
    assert ETCD_CONF_DIR in script
    secret = "-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MATERIAL\n-----END PRIVATE KEY-----\n"
    (tmp_path / "server.crt").write_text(SERVER_PEM)
    (tmp_path / "server.key").write_text(secret)
    (tmp_path / "peer.key").write_text(secret)
    (tmp_path / "peer.crt").write_text("garbage\n")
    (tmp_path / "ca-peer.crt").write_text(BOTH)
    # ca-client.crt is absent.
    result = subprocess.run(
        ["sh"],
        input=script.replace(ETCD_CONF_DIR, str(tmp_path)).encode(),
        capture_output=True,
        timeout=10,
        check=True,
    )
    out = result.stdout
    assert b"SECRET" not in out
    assert base64.b64encode(secret.encode()) not in out
    assert base64.b64encode(secret.encode()[:30])[:40] not in out
    names = sorted(x.split(b"=", 1)[0] for x in out.splitlines() if x.startswith(b"cke-cert-"))
    assert names == [b"cke-cert-ca-peer", b"cke-cert-peer", b"cke-cert-server"]
    certs, trusted = parse_cert_lines(out, A)
    assert certs == {"server": parse_certificate(SERVER_PEM)}
    assert trusted == {"ca-peer": (OLD_ID, NEW_ID)}


# ---------------------------------------------------------------------------
# 6. Vault away; the status summary
# ---------------------------------------------------------------------------


def test_held_for_vault_reports_due_renewals() -> None:
    c = cluster([A, B, C])
    s = with_certs(healthy_with_certs(c, [A, B, C]), C, peer=DUE, server=DUE)
    s = with_certs(s, A, server=DUE)
    d = run(c, s)
    only(d, EtcdRenewCertsOp, [A, C])
    held = held_for_vault(d, "sealed")
    assert held.operators == [] and held.phase is Phase.ETCD_WAIT
    assert rules(held) == {RULE_VAULT_AVAILABLE: (), RULE_CERTIFICATES_RENEWED: (A, C)}
    vault, renew = held.blocked
    assert "sealed" in vault.message
    assert f"{A}: server expires in" in renew.message
    assert f"{C}: peer expires in" in renew.message


def test_held_for_vault_leaves_a_decision_without_operations() -> None:
    c = cluster([A, B, C, D])
    s = with_node(healthy_with_certs(c, [A, B, C]), clean(D, ssh_ok=False))
    d = run(c, s)
    assert d.operators == [] and d.blocked
    assert held_for_vault(d, "sealed") == d
    done = Decision([], Phase.COMPLETED)
    assert held_for_vault(done, "sealed") == done


def test_certificate_summary_names_the_first_expiry() -> None:
    first = cert(remaining=10 * DAY)
    s = ClusterStatus(
        nodes={
            B: NodeStatus(B, ssh_ok=True, certs={"server": FRESH, "peer": first}),
            A: NodeStatus(A, ssh_ok=False),
        }
    )
    summary = certificate_summary(s)
    assert summary == {
        B: {
            "certificate": "peer",
            "serial": "1",
            "not-after": _time(NOW + 10 * DAY).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    }


def test_due_describe() -> None:
    assert Due(A, "server", "missing or unreadable", None).describe() == (
        f"{A} server: missing or unreadable"
    )
