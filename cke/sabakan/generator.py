"""The cluster generator of the sabakan integration: machines + template -> cluster.

:func:`generate` is pure: the machines sabakan lists, the cluster template, the
current cluster (``None`` the first time) and the constraints in; a
:class:`Generated` (the new cluster, the changes made in words, the changes held
back) or a :class:`~cke.sabakan.rules.Refusal` out.  Same inputs, same output:
machines are looked at in address order, whatever order they come in.

What it does (after CKE's ``sabakan/generator.go`` and ``docs/sabakan-integration.md``):

* The template is a :class:`~cke.cluster.Cluster` whose nodes are node templates:
  exactly one control-plane template and one or more worker templates, addresses
  empty.  A template's ``cke.cybozu.com/role`` label selects the sabakan role of the
  machines it fits (no label: any role); two or more worker templates must each
  have their own role.
* A machine is known by its first IPv4 address, which becomes the node's address;
  the hostname is left empty, so the node is named by its address (as upstream).
  Machines without IPv4 address are ignored.
* First generation: ``control-plane-count`` healthy machines of the control-plane
  role become control planes, one at a time, each time the machine in the rack with
  the fewest control planes so far, then the one that retires latest.  Every other
  healthy machine that a worker template fits becomes a worker.
* Later generations change at most one control plane: when ``control-plane-count``
  grew by one, one is added; when it shrank by one, the worst one (missing, then not
  healthy, then in the most crowded rack, then retiring first) leaves; otherwise a
  control plane whose machine is missing, unhealthy, unreachable, retiring or
  retired is replaced.  A new control plane is an unused healthy machine of the
  control-plane role, else a healthy worker (promoted), chosen as above.  A control
  plane that leaves becomes a worker when a worker template fits its machine, and
  is dropped otherwise.  Further broken control planes wait for the next generation
  (held under ``one-control-plane-change``; ``Generated.pending`` is then true).
* Workers: every healthy machine not yet in the cluster that a worker template fits
  is added; a worker whose machine sabakan no longer lists is removed; a worker
  whose machine is retired is removed while ``minimum-workers-rate`` allows
  (workers left >= rate% of the machines listed).  Other workers stay.
* Nodes are rebuilt from their template and machine every time, so template changes
  reach every node.  The cluster's other fields are the template's.  Control planes
  come first, then workers, each in address order.

Simplifications against upstream, and why:

* Labels, annotations and taints under ``cke.cybozu.com/`` or
  ``node-role.kubernetes.io/`` are reserved by ``cke/cluster.py`` and refused in a
  stored cluster, so the ones upstream sets (``cke.cybozu.com/rack``, ``.../role``,
  ``.../index-in-rack``, ``.../retire-month``, ``.../register-month``,
  ``.../retire-year``, ``sabakan.cke.cybozu.com/<label>``,
  ``node-role.kubernetes.io/<role>``, the ``cke.cybozu.com/serial`` and date
  annotations, and the ``cke.cybozu.com/state`` taints of unreachable, retiring and
  retired machines) are left out; :func:`machine_metadata` computes them all, ready
  for when the cluster model accepts generator-owned keys.  The template's own
  ``cke.cybozu.com/role`` selector label is not copied to the nodes.
  ``topology.kubernetes.io/zone: rack<N>`` is set.
* Upstream scores the retire date in coarse buckets relative to the present; here
  the later date simply wins (no clock needed).  A machine without a retire date
  ranks as retiring first, as upstream's zero date does.
* Upstream keeps Kubernetes node taints in mind (tainted machines are not picked,
  spare-node taints are preferred); there is no Kubernetes status here, so neither.
* Upstream waits 300 s before removing a retired worker; no clock here, so it is
  removed at once (within ``minimum-workers-rate``).
* Upstream counts only missing machines as lost control planes; here an unhealthy,
  unreachable, retiring or retired one is lost too (updating and uninitialized ones
  are kept, as upstream kept them when it replaced control planes).
* Upstream adds all control planes a grown ``control-plane-count`` needs at once;
  here one per generation, so a count more than one away is refused.
* Upstream overwrites machines that share an address; here they are left out.
* Template ``hostname``/``host_key`` are ignored (one template, many machines);
  the template's ``port`` is used.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cke.cluster import Cluster, Constraints, Node, Taint, reserved_key_problem
from cke.sabakan.rules import (
    RULE_ONE_CONTROL_PLANE_CHANGE,
    RULE_ONE_MACHINE_PER_ADDRESS,
    RULE_WORKER_TEMPLATE_MATCHES,
    Refusal,
    enough_control_planes_survive,
    healthy_candidate_available,
    keep_etcd_majority,
    minimum_workers_rate,
    one_control_plane_change,
    one_control_plane_step,
    template_role,
    valid_cluster,
    valid_template,
)
from sabakan.model import Machine, MachineState

__all__ = [
    "KEPT_CONTROL_PLANE_STATES",
    "LABEL_ZONE",
    "MISSING",
    "Generated",
    "NodeMetadata",
    "generate",
    "machine_address",
    "machine_metadata",
]

LABEL_ZONE = "topology.kubernetes.io/zone"
MISSING = "missing from sabakan"
"""How a node whose machine sabakan does not list is described."""

KEPT_CONTROL_PLANE_STATES = frozenset(
    {MachineState.HEALTHY, MachineState.UPDATING, MachineState.UNINITIALIZED}
)
"""A control plane in any other state (or missing) is replaced."""

_STATE_TAINTS = {
    MachineState.UNREACHABLE: ("unreachable", "NoSchedule"),
    MachineState.RETIRING: ("retiring", "NoExecute"),
    MachineState.RETIRED: ("retired", "NoExecute"),
}


@dataclass(frozen=True)
class Generated:
    """A generated cluster: ``changes`` says what differs from the current one (empty:
    nothing), ``held`` what the rules held back for now."""

    cluster: Cluster
    changes: tuple[str, ...]
    held: tuple[Refusal, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def pending(self) -> bool:
        """A control-plane change waits for the next generation."""
        return any(h.rule == RULE_ONE_CONTROL_PLANE_CHANGE for h in self.held)


@dataclass(frozen=True)
class NodeMetadata:
    labels: dict[str, str]
    annotations: dict[str, str]
    taints: tuple[Taint, ...]


# ---------------------------------------------------------------------------
# Machines.
# ---------------------------------------------------------------------------


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _address_key(address: str) -> tuple[int, int, str]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0, address)
    return (ip.version, int(ip), address)


def machine_address(machine: Machine) -> str | None:
    """The node address of a machine: its first IPv4 address (None: it has none)."""
    return _normal(machine.spec.ipv4[0]) if machine.spec.ipv4 else None


def _utc(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _retires_late_first(machine: Machine) -> tuple[int, float]:
    """Sorts the machine that retires latest first; no retire date last."""
    when = machine.spec.retire_date
    return (1, 0.0) if when is None else (0, -_utc(when).timestamp())


def _index(machines: Iterable[Machine]) -> tuple[dict[str, Machine], list[Refusal]]:
    by_address: dict[str, list[Machine]] = {}
    for m in machines:
        address = machine_address(m)
        if address is not None:
            by_address.setdefault(address, []).append(m)
    index: dict[str, Machine] = {}
    held: list[Refusal] = []
    for address in sorted(by_address, key=_address_key):
        found = by_address[address]
        if len(found) == 1:
            index[address] = found[0]
            continue
        serials = ", ".join(sorted(m.spec.serial for m in found))
        held.append(
            Refusal(
                RULE_ONE_MACHINE_PER_ADDRESS,
                f"machines {serials} share the address {address}; they are left out until "
                "sabakan lists one machine there.",
                (address,),
            )
        )
    return index, held


def machine_metadata(machine: Machine, *, control_plane: bool) -> NodeMetadata:
    """Everything upstream derives from a machine for its node, reserved keys included
    (``docs/sabakan-integration.md``, "Node labels", "Node annotations", "Taint nodes")."""
    spec = machine.spec
    labels = {f"sabakan.cke.cybozu.com/{k}": v for k, v in spec.labels.items()}
    labels["cke.cybozu.com/rack"] = str(spec.rack)
    labels["cke.cybozu.com/index-in-rack"] = str(spec.index_in_rack)
    labels["cke.cybozu.com/role"] = spec.role
    labels["cke.cybozu.com/register-month"] = _utc(spec.register_date).strftime("%Y-%m")
    annotations = {
        "cke.cybozu.com/serial": spec.serial,
        "cke.cybozu.com/register-date": _rfc3339(spec.register_date),
    }
    if spec.retire_date is not None:
        labels["cke.cybozu.com/retire-month"] = _utc(spec.retire_date).strftime("%Y-%m")
        labels["cke.cybozu.com/retire-year"] = str(_utc(spec.retire_date).year)
        annotations["cke.cybozu.com/retire-date"] = _rfc3339(spec.retire_date)
    if spec.role:
        labels[f"node-role.kubernetes.io/{spec.role}"] = "true"
    if control_plane:
        labels["node-role.kubernetes.io/master"] = "true"
        labels["node-role.kubernetes.io/control-plane"] = "true"
    labels[LABEL_ZONE] = f"rack{spec.rack}"
    taints: tuple[Taint, ...] = ()
    state_taint = _STATE_TAINTS.get(machine.status.state)
    if state_taint is not None:
        value, effect = state_taint
        taints = (Taint(key="cke.cybozu.com/state", value=value, effect=effect),)
    return NodeMetadata(labels, annotations, taints)


def _rfc3339(when: dt.datetime) -> str:
    return _utc(when).astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _allowed(key: str) -> bool:
    return reserved_key_problem(key) is None


def _node(machine: Machine, template: Node, *, control_plane: bool) -> Node:
    """The node of ``machine`` from its template (upstream's ``MachineToNode``), less the
    keys ``cke/cluster.py`` reserves."""
    meta = machine_metadata(machine, control_plane=control_plane)
    # Upstream's precedence: machine labels < template labels < generated labels.
    labels = {k: v for k, v in meta.labels.items() if k.startswith("sabakan.")}
    labels.update(template.labels)
    labels.update({k: v for k, v in meta.labels.items() if not k.startswith("sabakan.")})
    annotations = dict(template.annotations)
    annotations.update(meta.annotations)
    taints = [*template.taints, *meta.taints]
    address = machine_address(machine)
    assert address is not None
    return Node(
        address=address,
        user=template.user,
        port=template.port,
        control_plane=control_plane,
        labels={k: v for k, v in labels.items() if _allowed(k)},
        annotations={k: v for k, v in annotations.items() if _allowed(k)},
        taints=[t for t in taints if _allowed(t.key)],
    )


# ---------------------------------------------------------------------------
# Templates.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Templates:
    control_plane: Node
    workers: tuple[Node, ...]

    @property
    def control_plane_role(self) -> str:
        return template_role(self.control_plane.labels)

    def fits_control_plane(self, machine: Machine) -> bool:
        role = self.control_plane_role
        return not role or role == machine.spec.role

    def worker_for(self, machine: Machine) -> Node | None:
        if len(self.workers) == 1:
            role = template_role(self.workers[0].labels)
            return self.workers[0] if not role or role == machine.spec.role else None
        for node in self.workers:
            if template_role(node.labels) == machine.spec.role:
                return node
        return None


def _templates(template: Cluster) -> _Templates:
    (control_plane,) = template.control_planes
    return _Templates(control_plane, tuple(template.workers))


# ---------------------------------------------------------------------------
# Members: the nodes of the next cluster while it is being decided.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    address: str
    machine: Machine | None  # None: sabakan does not list it (kept as it is)
    current: Node | None  # the node of the current cluster, if any

    @property
    def state(self) -> str:
        return MISSING if self.machine is None else self.machine.status.state.value

    @property
    def lost(self) -> bool:
        return self.machine is None or self.machine.status.state not in KEPT_CONTROL_PLANE_STATES


def _rack_counts(members: Iterable[_Member]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for m in members:
        if m.machine is not None:
            counts[m.machine.spec.rack] = counts.get(m.machine.spec.rack, 0) + 1
    return counts


def _worst_first(members: Sequence[_Member]) -> list[_Member]:
    """Control planes in the order they should leave (upstream's lowest score first)."""
    racks = _rack_counts(members)

    def key(m: _Member) -> tuple[int, int, tuple[int, float], tuple[int, int, str]]:
        if m.machine is None:
            return (0, 0, (0, 0.0), _address_key(m.address))
        state = m.machine.status.state
        klass = 1 if m.lost else 2 if state != MachineState.HEALTHY else 3
        late, stamp = _retires_late_first(m.machine)
        return (klass, -racks[m.machine.spec.rack], (-late, -stamp), _address_key(m.address))

    return sorted(members, key=key)


@dataclass
class _Plan:
    control_planes: list[_Member]
    demoted: list[_Member]  # leave the control plane, become workers
    promoted: set[str]  # workers that become control planes
    changes: list[str]
    held: list[Refusal]


def _candidates(
    index: dict[str, Machine],
    templates: _Templates,
    control_planes: Sequence[_Member],
    current_workers: set[str],
    current_nodes: set[str],
) -> tuple[list[Machine], list[Machine]]:
    """Healthy machines of the control-plane role: (unused ones, current workers)."""
    taken = {m.address for m in control_planes}
    healthy = [
        m
        for address, m in index.items()
        if address not in taken
        and m.status.state == MachineState.HEALTHY
        and templates.fits_control_plane(m)
    ]
    unused = [m for m in healthy if machine_address(m) not in current_nodes]
    workers = [m for m in healthy if machine_address(m) in current_workers]
    return unused, workers


def _best(machines: Sequence[Machine], control_planes: Sequence[_Member]) -> Machine:
    """The machine in the least used rack, then retiring latest, then by address."""
    racks = _rack_counts(control_planes)

    def key(m: Machine) -> tuple[int, tuple[int, float], tuple[int, int, str]]:
        address = machine_address(m)
        assert address is not None
        return (racks.get(m.spec.rack, 0), _retires_late_first(m), _address_key(address))

    return min(machines, key=key)


def _describe_new(machine: Machine, *, promoted: bool) -> str:
    what = "worker " if promoted else ""
    return f"{what}{machine_address(machine)} (rack {machine.spec.rack})"


def _plan_control_planes(
    index: dict[str, Machine],
    templates: _Templates,
    current: Cluster | None,
    target: int,
) -> _Plan | Refusal:
    current_cps = current.control_planes if current is not None else []
    current_workers = {_normal(n.address) for n in current.workers} if current else set()
    current_nodes = {_normal(n.address) for n in current.nodes} if current else set()
    members = [_Member(_normal(n.address), index.get(_normal(n.address)), n) for n in current_cps]
    plan = _Plan(members, [], set(), [], [])
    role = templates.control_plane_role

    def pick(needed: int) -> list[tuple[Machine, bool]] | Refusal:
        unused, workers = _candidates(
            index, templates, plan.control_planes, current_workers, current_nodes
        )
        available = [machine_address(m) or "" for m in (*unused, *workers)]
        refusal = healthy_candidate_available(available, needed, role)
        if refusal is not None:
            return refusal
        picked: list[tuple[Machine, bool]] = []
        for _ in range(needed):
            promoted = not unused
            best = _best(workers if promoted else unused, plan.control_planes)
            (workers if promoted else unused).remove(best)
            address = machine_address(best)
            assert address is not None
            plan.control_planes.append(_Member(address, best, None))
            if promoted:
                plan.promoted.add(address)
            picked.append((best, promoted))
        return picked

    def leave(member: _Member) -> str:
        """``member`` leaves the control planes: a worker if a template fits, else gone."""
        plan.control_planes.remove(member)
        if member.machine is not None and templates.worker_for(member.machine) is not None:
            plan.demoted.append(member)
            return f"demote control plane {member.address} ({member.state}) to worker"
        reason = "" if member.machine is None else ", no worker template fits it"
        return f"remove control plane {member.address} ({member.state}{reason})"

    if not members:
        picked = pick(target)
        if isinstance(picked, Refusal):
            return picked
        for machine, promoted in picked:
            verb = "promote" if promoted else "add"
            plan.changes.append(f"{verb} control plane {_describe_new(machine, promoted=promoted)}")
        return plan

    lost = {m.address: m.state for m in members if m.lost}
    refusal = enough_control_planes_survive([m.address for m in members], lost) or (
        one_control_plane_step(len(members), target)
    )
    if refusal is not None:
        return refusal

    if target > len(members):
        picked = pick(1)
        if isinstance(picked, Refusal):
            return picked
        machine, promoted = picked[0]
        verb = "promote" if promoted else "add"
        plan.changes.append(f"{verb} control plane {_describe_new(machine, promoted=promoted)}")
    elif target < len(members):
        plan.changes.append(leave(_worst_first(members)[0]))
    elif lost:
        worst = _worst_first(members)[0]
        fate = leave(worst)
        picked = pick(1)
        if isinstance(picked, Refusal):
            return picked
        machine, promoted = picked[0]
        plan.changes.append(
            f"replace control plane {worst.address} ({worst.state}) with "
            f"{_describe_new(machine, promoted=promoted)}"
        )
        plan.changes.append(fate)
    for member in plan.control_planes:
        if member.lost:
            plan.held.append(
                Refusal(
                    RULE_ONE_CONTROL_PLANE_CHANGE,
                    f"control plane {member.address} ({member.state}) waits for a later "
                    "generation: one control plane changes per generation.",
                    (member.address,),
                )
            )
    return plan


# ---------------------------------------------------------------------------
# The generator.
# ---------------------------------------------------------------------------


def generate(
    machines: Iterable[Machine],
    template: Cluster,
    current: Cluster | None,
    constraints: Constraints,
) -> Generated | Refusal:
    """The next cluster from sabakan's ``machines``, or why there is none."""
    refusal = valid_template(template)
    if refusal is not None:
        return refusal
    templates = _templates(template)
    index, held = _index(machines)

    plan = _plan_control_planes(index, templates, current, constraints.control_plane_count)
    if isinstance(plan, Refusal):
        return plan
    changes = list(plan.changes)
    held += plan.held

    # Workers: the current ones still listed, the demoted control planes, then every
    # healthy machine not yet used that a worker template fits.
    workers: list[_Member] = []
    for node in current.workers if current is not None else []:
        address = _normal(node.address)
        if address in plan.promoted:
            continue
        machine = index.get(address)
        if machine is None:
            changes.append(f"remove worker {address} ({MISSING})")
            continue
        workers.append(_Member(address, machine, node))
    workers += plan.demoted
    used = {m.address for m in plan.control_planes} | {m.address for m in workers}
    for address, machine in index.items():
        if (
            address not in used
            and machine.status.state == MachineState.HEALTHY
            and templates.worker_for(machine) is not None
        ):
            workers.append(_Member(address, machine, None))
            role = f", role {machine.spec.role}" if machine.spec.role else ""
            changes.append(f"add worker {address} (rack {machine.spec.rack}{role})")

    retired = sorted(
        (w for w in workers if w.machine and w.machine.status.state == MachineState.RETIRED),
        key=lambda w: _address_key(w.address),
    )
    for member in retired:
        refusal = minimum_workers_rate(
            len(workers) - 1, len(index), constraints.minimum_workers_rate, member.address
        )
        if refusal is not None:
            held.append(refusal)
            continue
        workers.remove(member)
        changes.append(f"remove worker {member.address} (retired)")

    nodes: list[Node] = []
    for member in sorted(plan.control_planes, key=lambda m: _address_key(m.address)):
        if member.machine is None:
            assert member.current is not None
            nodes.append(member.current)
        else:
            nodes.append(_node(member.machine, templates.control_plane, control_plane=True))
    for member in sorted(workers, key=lambda m: _address_key(m.address)):
        assert member.machine is not None
        worker_template = templates.worker_for(member.machine)
        if worker_template is not None:
            nodes.append(_node(member.machine, worker_template, control_plane=False))
            continue
        assert member.current is not None
        nodes.append(member.current)
        held.append(
            Refusal(
                RULE_WORKER_TEMPLATE_MATCHES,
                f"worker {member.address} (role {member.machine.spec.role!r}) fits no worker "
                "template; it is kept as it is.",
                (member.address,),
            )
        )
    cluster = template.model_copy(update={"nodes": nodes}, deep=True)

    current_cps = [n.address for n in current.control_planes] if current is not None else []
    refusal = (
        one_control_plane_change(
            {_normal(a) for a in current_cps}, {_normal(n.address) for n in cluster.control_planes}
        )
        or keep_etcd_majority(current_cps, cluster)
        or valid_cluster(cluster, constraints)
    )
    if refusal is not None:
        return refusal
    if current is not None:
        changes += _node_updates(current, cluster)
    return Generated(cluster, tuple(changes), tuple(held))


def _node_updates(current: Cluster, cluster: Cluster) -> list[str]:
    """The changes of nodes that stay in their role, and of everything but nodes."""
    changes: list[str] = []
    old = {_normal(n.address): n for n in current.nodes}
    for node in cluster.nodes:
        before = old.get(_normal(node.address))
        if before is None or before == node or before.control_plane != node.control_plane:
            continue
        fields = [f for f in Node.model_fields if getattr(before, f) != getattr(node, f)]
        changes.append(f"update node {node.address} ({', '.join(fields)})")
    settings = [
        f
        for f in Cluster.model_fields
        if f != "nodes" and getattr(current, f) != getattr(cluster, f)
    ]
    if settings:
        changes.append(f"update cluster settings from the template ({', '.join(settings)})")
    same_nodes = sorted(
        current.nodes, key=lambda n: (not n.control_plane, _address_key(_normal(n.address)))
    )
    if not changes and current.nodes != cluster.nodes and same_nodes == cluster.nodes:
        changes.append("reorder nodes (control planes first, then by address)")
    return changes
