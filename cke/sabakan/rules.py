"""The rules of cluster generation from sabakan, one small pure predicate per rule.

Each predicate returns ``None`` when the generation may go on, or a :class:`Refusal`
that names the rule (a stable string shown by ``ckecli status``), says why, and lists
the nodes involved.  :func:`cke.sabakan.generator.generate` asks them; a refusal of
a *must* stops the generation (the current cluster stays), a refusal of a *should*
(``one-control-plane-change`` for a further broken control plane,
``minimum-workers-rate`` for a retired worker) only holds that one change back.

Rule names:

=================================  ==================================================
``valid-template``                 one control-plane template, at least one worker
                                   template, worker templates told apart by role,
                                   and every field a cluster would accept
``enough-control-planes-survive``  more than half of the current control planes
                                   must still be usable machines
``one-control-plane-change``       at most one control plane leaves and one joins
                                   per generation
``healthy-candidate-available``    a new control plane needs a healthy machine of
                                   the control-plane role
``minimum-workers-rate``           a retired worker leaves only while the workers
                                   stay at least that percentage of the machines
``keep-etcd-majority``             the new control planes keep a majority of the
                                   current ones (the rule of ``cke/server/safety.py``)
``valid-cluster``                  the result passes ``validate_cluster``
``worker-template-matches``        (held only) a worker whose machine no template
                                   fits is kept as it is
``one-machine-per-address``        (held only) machines that share an address are
                                   left out
=================================  ==================================================
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cke.cluster import Cluster, ClusterError, Constraints, cluster_problems, validate_cluster
from cke.server.safety import RULE_KEEP_ETCD_MAJORITY, check_control_plane_change

__all__ = [
    "LABEL_ROLE",
    "RULE_ENOUGH_CONTROL_PLANES_SURVIVE",
    "RULE_HEALTHY_CANDIDATE_AVAILABLE",
    "RULE_KEEP_ETCD_MAJORITY",
    "RULE_MINIMUM_WORKERS_RATE",
    "RULE_ONE_CONTROL_PLANE_CHANGE",
    "RULE_ONE_MACHINE_PER_ADDRESS",
    "RULE_VALID_CLUSTER",
    "RULE_VALID_TEMPLATE",
    "RULE_WORKER_TEMPLATE_MATCHES",
    "Refusal",
    "enough_control_planes_survive",
    "healthy_candidate_available",
    "keep_etcd_majority",
    "minimum_workers_rate",
    "one_control_plane_change",
    "one_control_plane_step",
    "template_role",
    "valid_cluster",
    "valid_template",
]

RULE_VALID_TEMPLATE = "valid-template"
RULE_ENOUGH_CONTROL_PLANES_SURVIVE = "enough-control-planes-survive"
RULE_ONE_CONTROL_PLANE_CHANGE = "one-control-plane-change"
RULE_HEALTHY_CANDIDATE_AVAILABLE = "healthy-candidate-available"
RULE_MINIMUM_WORKERS_RATE = "minimum-workers-rate"
RULE_VALID_CLUSTER = "valid-cluster"
RULE_WORKER_TEMPLATE_MATCHES = "worker-template-matches"
RULE_ONE_MACHINE_PER_ADDRESS = "one-machine-per-address"

LABEL_ROLE = "cke.cybozu.com/role"
"""The template label that selects the sabakan role of the machines a node template fits."""

# Addresses given to the template's nodes while checking them as cluster nodes
# (198.18.0.0/15 is the benchmarking range; it never reaches a cluster).
_PROBE_NETWORK = ipaddress.IPv4Address("198.18.0.0")


@dataclass(frozen=True)
class Refusal:
    """A generation (or one change of it) the rules held back, and why."""

    rule: str
    reason: str
    nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "reason": self.reason, "nodes": list(self.nodes)}


def _names(addresses: Iterable[str]) -> str:
    return ", ".join(addresses)


def template_role(labels: Mapping[str, str]) -> str:
    """The role a node template selects (``""``: any role)."""
    return labels.get(LABEL_ROLE, "")


# ---------------------------------------------------------------------------
# valid-template.  Upstream (``sabakan/template.go``): at least two nodes, exactly
# one control plane, and when there are two or more worker templates each has its
# own role.  Each node template must be a valid node but for its address, which
# must be empty (the machines give it).
# ---------------------------------------------------------------------------


def valid_template(template: Cluster) -> Refusal | None:
    """Refuse a template the generator cannot use; every problem named by its field."""
    problems: list[str] = []
    control_planes = [i for i, n in enumerate(template.nodes) if n.control_plane]
    workers = [n for n in template.nodes if not n.control_plane]
    if len(control_planes) != 1:
        problems.append(
            f"template.nodes: want exactly one control-plane node template, "
            f"got {len(control_planes)}"
        )
    if not workers:
        problems.append("template.nodes: want at least one worker node template")
    roles = [template_role(n.labels) for n in workers]
    if len(workers) >= 2 and (not all(roles) or len(set(roles)) != len(roles)):
        problems.append(
            f"template.nodes: with several worker templates, each needs its own {LABEL_ROLE} label"
        )
    for i, node in enumerate(template.nodes):
        if node.address:
            problems.append(f"template.nodes[{i}].address: must be empty in a template")
    probes = [
        node.model_copy(
            update={
                "address": str(_PROBE_NETWORK + i + 1),
                "hostname": "",
                "host_key": None,
                "labels": {k: v for k, v in node.labels.items() if k != LABEL_ROLE},
            }
        )
        for i, node in enumerate(template.nodes)
    ]
    probe = template.model_copy(update={"nodes": probes})
    for path, problem in cluster_problems(probe):
        if path != "nodes":  # "nodes": no control plane, already said above
            problems.append(f"template.{path}: {problem}")
    if not problems:
        return None
    return Refusal(RULE_VALID_TEMPLATE, "; ".join(problems))


# ---------------------------------------------------------------------------
# enough-control-planes-survive.  Upstream (``removeNonExistentNode``): when
# ``surviving * 2 <= current`` control planes, replacing the rest would break etcd,
# and an administrator must fix the cluster.  Here a control plane survives when
# its machine is listed and neither unhealthy, unreachable, retiring nor retired.
# ---------------------------------------------------------------------------


def enough_control_planes_survive(
    current: Sequence[str], lost: Mapping[str, str]
) -> Refusal | None:
    """Refuse when the control planes of ``current`` not in ``lost`` (address -> why)
    are half of them or fewer.  No current control plane: nothing to protect."""
    if not current:
        return None
    surviving = [a for a in current if a not in lost]
    if len(surviving) * 2 > len(current):
        return None
    gone = [a for a in current if a in lost]
    detail = _names(f"{a} ({lost[a]})" for a in gone)
    return Refusal(
        RULE_ENOUGH_CONTROL_PLANES_SURVIVE,
        f"only {len(surviving)} of the {len(current)} control planes survive ({detail} "
        "lost); replacing half of them or more would break etcd. Fix the cluster by hand.",
        tuple(gone),
    )


# ---------------------------------------------------------------------------
# one-control-plane-change.  Each generation changes the etcd membership by at most
# one member leaving and one joining.  The result must have exactly
# ``control-plane-count`` control planes, so a count more than one away from the
# current one cannot be reached in one generation.
# ---------------------------------------------------------------------------


def one_control_plane_step(current_count: int, target: int) -> Refusal | None:
    """Refuse when ``control-plane-count`` (``target``) is more than one away from the
    current number of control planes (none: the first generation, any count)."""
    if current_count == 0 or abs(target - current_count) <= 1:
        return None
    return Refusal(
        RULE_ONE_CONTROL_PLANE_CHANGE,
        f"control-plane-count is {target} but the cluster has {current_count} control "
        "planes; one control plane changes per generation. Change control-plane-count "
        "by one at a time.",
    )


def one_control_plane_change(current: Collection[str], proposed: Collection[str]) -> Refusal | None:
    """Refuse a proposal in which more than one control plane leaves, or more than one
    joins, the current set (empty: the first generation, anything goes)."""
    old, new = set(current), set(proposed)
    if not old:
        return None
    leaving, joining = sorted(old - new), sorted(new - old)
    if len(leaving) <= 1 and len(joining) <= 1:
        return None
    return Refusal(
        RULE_ONE_CONTROL_PLANE_CHANGE,
        f"the result would change control planes {_names(leaving + joining)} at once; "
        "one control plane changes per generation.",
        tuple(leaving + joining),
    )


# ---------------------------------------------------------------------------
# healthy-candidate-available.  Upstream (``fill``): a control plane is picked among
# the healthy machines of the control-plane template's role, unused ones first, then
# workers; when there is none, the generation fails ("no healthy machine").
# ---------------------------------------------------------------------------


def healthy_candidate_available(
    candidates: Sequence[str], needed: int, role: str
) -> Refusal | None:
    """Refuse when fewer than ``needed`` healthy machines of ``role`` (``""``: any) can
    become control planes."""
    if len(candidates) >= needed:
        return None
    of_role = f"of role {role!r} " if role else ""
    return Refusal(
        RULE_HEALTHY_CANDIDATE_AVAILABLE,
        f"{needed} healthy machine(s) {of_role}needed for the control plane, "
        f"{len(candidates)} available; add or repair machines in sabakan.",
        tuple(candidates),
    )


# ---------------------------------------------------------------------------
# minimum-workers-rate.  Upstream (``decreaseWorker``, docs/constraints.md: "the
# minimum percentage of workers/machines"): a retired worker is removed only when
# the workers left are at least ``minimum-workers-rate`` percent of the machines
# sabakan lists.
# ---------------------------------------------------------------------------


def minimum_workers_rate(
    workers_after: int, machines: int, rate: int, address: str
) -> Refusal | None:
    """Refuse removing worker ``address`` when ``workers_after`` would be less than
    ``rate`` percent of ``machines``."""
    if workers_after * 100 >= rate * machines:
        return None
    return Refusal(
        RULE_MINIMUM_WORKERS_RATE,
        f"retired worker {address} stays: removing it would leave {workers_after} worker(s) "
        f"for {machines} machine(s), below minimum-workers-rate {rate}%.",
        (address,),
    )


# ---------------------------------------------------------------------------
# keep-etcd-majority.  What ``ckecli cluster set`` and the server refuse
# (``cke/server/safety.py``), checked against the current control planes, so that
# the generator never proposes a cluster the server would not take.
# ---------------------------------------------------------------------------


def keep_etcd_majority(current: Collection[str], proposed: Cluster) -> Refusal | None:
    """Refuse when the proposed control planes keep fewer than a majority of ``current``."""
    blocked = check_control_plane_change(current, proposed)
    if blocked is None:
        return None
    return Refusal(blocked.rule, blocked.message, blocked.nodes)


# ---------------------------------------------------------------------------
# valid-cluster.  The result must pass what every stored cluster passes.
# ---------------------------------------------------------------------------


def valid_cluster(cluster: Cluster, constraints: Constraints) -> Refusal | None:
    """Refuse a result that ``validate_cluster`` refuses; the reason names the fields."""
    try:
        validate_cluster(cluster, constraints)
    except ClusterError as exc:
        return Refusal(RULE_VALID_CLUSTER, f"the generated cluster is invalid: {exc}")
    return None
