"""Operations on the managed etcd cluster (CKE's ``op/etcd``), and its service spec.

Each operator is built by the decision function from the collected status and
runs as a list of small commands; a new leader can always start afresh because
every command checks what is already done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from etcd3aio import EtcdError

from cke.cluster import Cluster, Node
from cke.common.logs import get_logger
from cke.etcdadmin import EtcdAdmin
from cke.nodes.pool import NodePool
from cke.nodes.runtime import NodeFile, Runtime, ServiceSpec, spec_path
from cke.op.base import Commander, CommandInfo, OpContext, Operator, Parallel
from cke.pki import CertIssuer
from cke.server.clusterstatus import ALARM_NOSPACE, EtcdMember, Trust

log = get_logger("cke.op.etcd")

ETCD_SERVICE = "etcd"
ETCD_DATA_DIR = "/var/lib/cke/etcd"
ETCD_CONF_DIR = "/etc/cke/etcd"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


def client_url(address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{ETCD_CLIENT_PORT}"


def peer_url(address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{ETCD_PEER_PORT}"


@dataclass(frozen=True)
class EtcdSpecArgs:
    """The arguments of a member's etcd; ``digest()`` of its ServiceSpec marks outdated ones."""

    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


def etcd_args(node: Node, cluster: Cluster) -> EtcdSpecArgs:
    """What makes a member *outdated* when it changes (not the initial-cluster flags)."""
    params = cluster.options.etcd
    args = (
        f"--name={node.name}",
        f"--data-dir={ETCD_DATA_DIR}",
        f"--listen-client-urls={client_url(node.address)}",
        f"--advertise-client-urls={client_url(node.address)}",
        f"--listen-peer-urls={peer_url(node.address)}",
        f"--initial-advertise-peer-urls={peer_url(node.address)}",
        f"--cert-file={ETCD_CONF_DIR}/server.crt",
        f"--key-file={ETCD_CONF_DIR}/server.key",
        f"--trusted-ca-file={ETCD_CONF_DIR}/ca-client.crt",
        "--client-cert-auth=true",
        f"--peer-cert-file={ETCD_CONF_DIR}/peer.crt",
        f"--peer-key-file={ETCD_CONF_DIR}/peer.key",
        f"--peer-trusted-ca-file={ETCD_CONF_DIR}/ca-peer.crt",
        "--peer-client-cert-auth=true",
        "--enable-v2=false",
        "--logger=zap",
        "--log-outputs=stderr",
        *params.extra_args,
    )
    return EtcdSpecArgs(args, tuple(sorted(params.extra_env.items())))


# -- what commands use ---------------------------------------------------------------------


@dataclass
class EtcdTools:
    """The services etcd commands need, put in ``OpContext.services['etcd-tools']``."""

    pool: NodePool
    runtime: Runtime
    admin: EtcdAdmin
    issuer: Callable[[], Awaitable[CertIssuer]]  # waits for Vault
    ca: Callable[[str], Awaitable[str]]  # CA certificate PEM by ckecli name


def tools(ctx: OpContext) -> EtcdTools:
    found = ctx.services["etcd-tools"]
    assert isinstance(found, EtcdTools)
    return found


# The trust bundles of a member: file -> CA name. etcd reads them only when it starts
# (measured on etcd 3.5.1, see the README), so they are part of the spec: a new bundle
# makes the member outdated, and the decision restarts members one at a time.
TRUST_BUNDLE_FILES = (
    (f"{ETCD_CONF_DIR}/ca-client.crt", "etcd-client"),
    (f"{ETCD_CONF_DIR}/ca-peer.crt", "etcd-peer"),
)


def trust_files(trust: Trust | None) -> tuple[NodeFile, ...]:
    """The trust bundles ``trust`` holds, as files of the spec."""
    if trust is None:
        return ()
    return tuple(
        NodeFile(path, trust.bundles[ca].encode(), 0o644)
        for path, ca in TRUST_BUNDLE_FILES
        if ca in trust.bundles
    )


def etcd_service_spec(
    node: Node, cluster: Cluster, initial: tuple[str, ...] = (), trust: Trust | None = None
) -> ServiceSpec:
    """The member's spec; ``initial`` (initial-cluster flags) only matters on first start."""
    spec_args = etcd_args(node, cluster)
    return ServiceSpec(
        ETCD_SERVICE,
        cluster.binaries.etcd,
        spec_args.args,
        spec_args.env,
        files=trust_files(trust),
        start_args=initial,
        requires_path=f"{ETCD_DATA_DIR}/member",
    )


def desired_etcd_digest(node: Node, cluster: Cluster, trust: Trust | None = None) -> str:
    """The spec digest a member on ``node`` must run with; any other is outdated."""
    return etcd_service_spec(node, cluster, trust=trust).digest()


def initial_cluster_args(members: list[tuple[str, str]], state: str, token: str) -> tuple[str, ...]:
    """``--initial-cluster`` flags from (name, address) pairs."""
    joined = ",".join(f"{name}={peer_url(address)}" for name, address in sorted(members))
    return (
        f"--initial-cluster={joined}",
        f"--initial-cluster-state={state}",
        f"--initial-cluster-token={token}",
    )


# -- commands ------------------------------------------------------------------------------


class _Command(Commander):
    def __init__(self, name: str, target: str = "", detail: str = "") -> None:
        self._info = CommandInfo(name, target, detail)

    @property
    def info(self) -> CommandInfo:
        return self._info


@dataclass
class CertBundle:
    """A node's etcd certificates, held in memory only for the life of one operation."""

    files: dict[str, tuple[NodeFile, ...]] = field(default_factory=dict)


class IssueEtcdCerts(_Command):
    """Get every certificate first, so that no node is touched while Vault is away.

    The trust bundles are part of the service spec (``StartEtcd`` writes them); only
    when the decision had none (no CA in etcd when it decided) are the stored CAs
    written here, as before trust bundles existed.
    """

    def __init__(
        self, nodes: list[Node], bundle: CertBundle, trust: Trust | None = None, detail: str = ""
    ) -> None:
        super().__init__("issue-etcd-certificates", ",".join(n.address for n in nodes), detail)
        self.nodes = nodes
        self.bundle = bundle
        self.trust = trust

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        issuer = await t.issuer()
        in_spec = {
            path for path, ca in TRUST_BUNDLE_FILES if self.trust and ca in self.trust.bundles
        }
        extra = [
            NodeFile(path, (await t.ca(ca)).encode(), 0o644)
            for path, ca in TRUST_BUNDLE_FILES
            if path not in in_spec
        ]
        for node in self.nodes:
            server = await issuer.etcd_server(node.address, node.hostname)
            peer = await issuer.etcd_peer(node.address, node.hostname)
            # Each certificate goes in before its key: etcd loads the pair at every new
            # connection, and a pair that does not match is refused for that connection
            # only; the next handshake sees both files new.
            self.bundle.files[node.address] = (
                NodeFile(f"{ETCD_CONF_DIR}/server.crt", server.certificate.encode(), 0o644),
                NodeFile(f"{ETCD_CONF_DIR}/server.key", server.private_key.encode(), 0o600),
                NodeFile(f"{ETCD_CONF_DIR}/peer.crt", peer.certificate.encode(), 0o644),
                NodeFile(f"{ETCD_CONF_DIR}/peer.key", peer.private_key.encode(), 0o600),
                *extra,
            )


class WriteEtcdCerts(_Command):
    def __init__(self, node: Node, bundle: CertBundle) -> None:
        super().__init__("write-etcd-certificates", node.address, ETCD_CONF_DIR)
        self.node = node
        self.bundle = bundle

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        script = t.runtime.write_files_script(self.bundle.files[self.node.address])
        await run_script_on(t.pool, self.node, script)


class StartEtcd(_Command):
    def __init__(
        self,
        node: Node,
        cluster: Cluster,
        initial: tuple[str, ...] = (),
        trust: Trust | None = None,
    ) -> None:
        detail = next((a for a in initial if a.startswith("--initial-cluster-state")), "")
        super().__init__("start-etcd", node.address, detail)
        self.node = node
        self.cluster = cluster
        self.initial = initial
        self.trust = trust

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        spec = etcd_service_spec(self.node, self.cluster, self.initial, self.trust)
        await run_script_on(t.pool, self.node, t.runtime.start_script(spec))


class StopEtcd(_Command):
    def __init__(self, node: Node) -> None:
        super().__init__("stop-etcd", node.address)
        self.node = node

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        await run_script_on(t.pool, self.node, t.runtime.stop_script(ETCD_SERVICE))


def recorded_peer_url_sh() -> str:
    """Shell that prints ``cke-etcd-peer=URL``: the peer URL in the node's etcd spec record,
    i.e. which member the etcd data on the node belongs to (nothing if there is none)."""
    spec = spec_path(ETCD_SERVICE)
    return (
        f"if [ -f {spec} ]; then sed -n "
        '\'s/.*"--initial-advertise-peer-urls=\\([^"]*\\)".*/cke-etcd-peer=\\1/p\' '
        f"{spec} | head -n 1; fi\n"
    )


PEER_MARK = b"cke-etcd-peer="


def parse_recorded_peer_url(output: bytes) -> str | None:
    for line in output.splitlines():
        if line.startswith(PEER_MARK):
            return line[len(PEER_MARK) :].decode(errors="replace").strip()[:300] or None
    return None


class CheckEtcdDataOwner(_Command):
    """Right before a node's etcd is stopped and its data wiped: refuse when the data
    belongs to a current member (its spec record names that member's peer URL), or when
    the membership cannot be read.  The decision checked this on the collected status;
    this checks it again at the moment it matters, with a fresh member list."""

    def __init__(self, node: Node, ask: list[str]) -> None:
        super().__init__("check-etcd-data-owner", node.address)
        self.node = node
        self.ask = ask

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        st = await t.admin.status(self.ask)
        if not st.reachable:
            raise RuntimeError("etcd membership is unknown (no member answers); data kept")
        result = await t.pool.run(self.node, "sh -s", input=recorded_peer_url_sh().encode())
        if not result.ok:
            raise RuntimeError(f"{self.node.address}: cannot read the etcd spec record")
        peer = parse_recorded_peer_url(result.stdout)
        for m in st.members:
            if m.address == self.node.address or (peer is not None and peer in m.peer_urls):
                raise RuntimeError(
                    f"the etcd data on {self.node.address} belongs to member {m.address} "
                    f"({m.id:x}), which is still a member; data kept"
                )


class DestroyEtcdData(_Command):
    def __init__(self, node: Node) -> None:
        super().__init__("destroy-etcd-data", node.address, ETCD_DATA_DIR)
        self.node = node

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        await run_script_on(t.pool, self.node, t.runtime.remove_path_script(ETCD_DATA_DIR))


class WaitEtcdHealthy(_Command):
    """Wait until every listed member answers and the cluster has one leader.

    ``ask`` are further members to query: a learner cannot answer membership requests.
    """

    def __init__(
        self, addresses: list[str], timeout: float = 90.0, ask: list[str] | None = None
    ) -> None:
        super().__init__("wait-etcd-healthy", ",".join(addresses))
        self.addresses = addresses
        self.ask = ask or []
        self.timeout = timeout

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            st = await t.admin.status([*self.addresses, *self.ask])
            healthy = {m.address for m in st.members if m.healthy}
            if st.leader_id is not None and set(self.addresses) <= healthy:
                return
            if loop.time() > deadline:
                missing = sorted(set(self.addresses) - healthy)
                raise TimeoutError(f"etcd not healthy after {self.timeout:.0f}s: {missing}")
            # A status round is one request per member: cheap, and a member that just
            # started answers within a fraction of a second.
            await asyncio.sleep(0.1)


class SetupEtcdAuth(_Command):
    def __init__(self, addresses: list[str]) -> None:
        super().__init__("setup-etcd-auth", ",".join(addresses), "root, kube-apiserver")
        self.addresses = addresses

    async def run(self, ctx: OpContext) -> None:
        await tools(ctx).admin.setup_auth(self.addresses)


@dataclass
class JoinState:
    members: list[tuple[str, str]] = field(default_factory=list)


class AddLearner(_Command):
    def __init__(self, node: Node, via: list[str], join: JoinState) -> None:
        super().__init__("etcd-member-add", node.address, "learner")
        self.node = node
        self.via = via
        self.join = join

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        await t.admin.member_add(self.via, peer_url(self.node.address), learner=True)
        st = await t.admin.status(self.via)
        self.join.members = [(m.name or self.node.name, m.address) for m in st.members if m.address]
        if (self.node.name, self.node.address) not in self.join.members:
            self.join.members.append((self.node.name, self.node.address))


class StartJoiningEtcd(_Command):
    def __init__(
        self, node: Node, cluster: Cluster, join: JoinState, trust: Trust | None = None
    ) -> None:
        super().__init__("start-etcd", node.address, "--initial-cluster-state=existing")
        self.node = node
        self.cluster = cluster
        self.join = join
        self.trust = trust

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        initial = initial_cluster_args(self.join.members, "existing", self.cluster.name)
        spec = etcd_service_spec(self.node, self.cluster, initial, self.trust)
        await run_script_on(t.pool, self.node, t.runtime.start_script(spec))


class PromoteLearner(_Command):
    def __init__(self, member: EtcdMember, via: list[str], timeout: float = 60.0) -> None:
        super().__init__("etcd-member-promote", member.address)
        self.member = member
        self.via = via
        self.timeout = timeout

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                await t.admin.member_promote(self.via, self.member.id)
                return
            except EtcdError as exc:
                # etcd refuses while the learner is behind the leader's log.
                if loop.time() > deadline:
                    raise RuntimeError(f"learner not caught up: {exc}") from exc
                await asyncio.sleep(1.0)


class MoveLeader(_Command):
    def __init__(self, leader: EtcdMember, target: EtcdMember) -> None:
        super().__init__("etcd-move-leader", leader.address, f"to {target.address}")
        self.leader = leader
        self.target = target

    async def run(self, ctx: OpContext) -> None:
        await tools(ctx).admin.move_leader(self.leader.address, self.target.id)


class RemoveMember(_Command):
    def __init__(self, member: EtcdMember, via: list[str]) -> None:
        super().__init__("etcd-member-remove", member.address, f"id {member.id:x}")
        self.member = member
        self.via = via

    async def run(self, ctx: OpContext) -> None:
        await tools(ctx).admin.member_remove(self.via, self.member.id)


# A defragmentation copies the data in use into a new database file; its time grows with
# the data (up to the quota: 2 GiB by default, 8 GiB at most recommended).
DEFRAG_TIMEOUT = 600.0


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}MiB"


class DefragmentMember(_Command):
    """Defragment one member's database (it serves no request meanwhile)."""

    def __init__(self, member: EtcdMember, timeout: float = DEFRAG_TIMEOUT) -> None:
        detail = (
            f"db {_mib(member.db_size)}, in use {_mib(member.db_size_in_use)}"
            if member.db_size
            else ""
        )
        super().__init__("etcd-defragment", member.address, detail)
        self.member = member
        self.timeout = timeout

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await t.admin.defragment(self.member.address, self.timeout)
        log.info(
            "defragmented etcd member",
            member=self.member.address,
            db_size=self.member.db_size,
            db_size_in_use=self.member.db_size_in_use,
            seconds=round(loop.time() - started, 3),
        )


class CompactEtcd(_Command):
    """Compact the history up to the current revision (NOSPACE recovery only: watchers
    older than that revision must start again)."""

    def __init__(self, via: list[str], timeout: float = DEFRAG_TIMEOUT) -> None:
        super().__init__("etcd-compact", ",".join(via), "to the current revision")
        self.via = via
        self.timeout = timeout

    async def run(self, ctx: OpContext) -> None:
        revision = await tools(ctx).admin.compact(self.via, self.timeout)
        log.info("compacted etcd", revision=revision)


class DisarmAlarm(_Command):
    def __init__(self, via: list[str], alarm: str) -> None:
        super().__init__("etcd-alarm-disarm", ",".join(via), alarm)
        self.via = via
        self.alarm = alarm

    async def run(self, ctx: OpContext) -> None:
        disarmed = await tools(ctx).admin.disarm(self.via, self.alarm)
        log.info("disarmed etcd alarm", alarm=self.alarm, members=disarmed)


async def run_script_on(pool: NodePool, node: Node, script: bytes) -> None:
    result = await pool.run(node, "sh -s", input=script, update=True)
    if not result.ok:
        first = result.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(
            f"{node.address}: {first[-1] if first else 'exit ' + str(result.exit_status)}"
        )


# -- operators -----------------------------------------------------------------------------


class StepOperator(Operator):
    """An operator whose commands are known up front."""

    def __init__(self, name: str, targets: list[str], steps: list[Commander]) -> None:
        self._name = name
        self._targets = targets
        self._steps = steps
        self._next = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def targets(self) -> list[str]:
        return self._targets

    def next_command(self) -> Commander | None:
        if self._next >= len(self._steps):
            return None
        step = self._steps[self._next]
        self._next += 1
        return step


class EtcdBootstrapOp(StepOperator):
    """Start a new cluster on every control plane at once (initial-cluster-state new)."""

    def __init__(self, nodes: list[Node], cluster: Cluster, trust: Trust | None = None) -> None:
        self.nodes = nodes
        self.cluster = cluster
        bundle = CertBundle()
        addresses = [n.address for n in nodes]
        initial = initial_cluster_args([(n.name, n.address) for n in nodes], "new", cluster.name)
        steps: list[Commander] = [IssueEtcdCerts(nodes, bundle, trust)]
        steps.append(Parallel([WriteEtcdCerts(n, bundle) for n in nodes]))
        steps.append(Parallel([StartEtcd(n, cluster, initial, trust) for n in nodes]))
        steps += [WaitEtcdHealthy(addresses), SetupEtcdAuth(addresses)]
        super().__init__("etcd-bootstrap", addresses, steps)


class EtcdStartOp(StepOperator):
    """Start stopped members that keep their data (certificates are written afresh)."""

    def __init__(self, nodes: list[Node], cluster: Cluster, trust: Trust | None = None) -> None:
        self.nodes = nodes
        self.cluster = cluster
        bundle = CertBundle()
        steps: list[Commander] = [IssueEtcdCerts(nodes, bundle, trust)]
        steps.append(Parallel([WriteEtcdCerts(n, bundle) for n in nodes]))
        steps.append(Parallel([StartEtcd(n, cluster, trust=trust) for n in nodes]))
        super().__init__("etcd-start", [n.address for n in nodes], steps)


class EtcdAddMemberOp(StepOperator):
    """Add one control plane as a learner and start it (initial-cluster-state existing).

    Stale data on the node (from an earlier membership) is wiped first: the node is
    not a member now, so its data belongs to no one (rule 4).
    """

    def __init__(
        self,
        node: Node,
        cluster: Cluster,
        members: list[EtcdMember],
        trust: Trust | None = None,
    ) -> None:
        self.node = node
        self.cluster = cluster
        self.members = members
        bundle = CertBundle()
        join = JoinState()
        via = [m.address for m in members if m.healthy and not m.learner]
        steps: list[Commander] = [
            IssueEtcdCerts([node], bundle, trust),
            CheckEtcdDataOwner(node, via),
            StopEtcd(node),
            DestroyEtcdData(node),
            WriteEtcdCerts(node, bundle),
            AddLearner(node, via, join),
            StartJoiningEtcd(node, cluster, join, trust),
            # Until the learner answers, its node looks like one whose data was lost.
            WaitEtcdHealthy([node.address], ask=via),
        ]
        super().__init__("etcd-add-member", [node.address], steps)


class EtcdPromoteOp(StepOperator):
    """Promote a caught-up learner to a voting member."""

    def __init__(self, member: EtcdMember, via: list[str]) -> None:
        self.member = member
        # A learner cannot serve membership requests: ask the voters.
        super().__init__("etcd-promote-member", [member.address], [PromoteLearner(member, via)])


class EtcdRemoveMemberOp(StepOperator):
    """Remove one member (moving leadership away first), then stop it and wipe its data."""

    def __init__(
        self,
        member: EtcdMember,
        node: Node | None,
        move_leader_to: EtcdMember | None,
        via: list[str] | None = None,
    ) -> None:
        self.member = member
        self.node = node
        self.move_leader_to = move_leader_to
        others = via or ([move_leader_to.address] if move_leader_to else [])
        steps: list[Commander] = []
        if move_leader_to is not None:
            steps.append(MoveLeader(member, move_leader_to))
        steps.append(RemoveMember(member, others or [member.address]))
        if node is not None:
            ask = [a for a in others if a != member.address]
            if ask:
                steps.append(CheckEtcdDataOwner(node, ask))
            steps += [StopEtcd(node), DestroyEtcdData(node)]
        super().__init__("etcd-remove-member", [member.address], steps)


class EtcdDestroyDataOp(StepOperator):
    """Stop etcd on a node that is not a member and wipe its data directory."""

    def __init__(self, node: Node, ask: list[str]) -> None:
        self.node = node
        steps: list[Commander] = [CheckEtcdDataOwner(node, ask), StopEtcd(node)]
        steps.append(DestroyEtcdData(node))
        super().__init__("etcd-destroy-data", [node.address], steps)


class EtcdRestartOp(StepOperator):
    """Restart one outdated member with its new spec (moving leadership away first)."""

    def __init__(
        self,
        node: Node,
        cluster: Cluster,
        move_leader_to: EtcdMember | None,
        leader: EtcdMember | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.node = node
        self.cluster = cluster
        self.move_leader_to = move_leader_to
        bundle = CertBundle()
        steps: list[Commander] = [IssueEtcdCerts([node], bundle, trust)]
        if move_leader_to is not None and leader is not None:
            steps.append(MoveLeader(leader, move_leader_to))
        steps += [
            WriteEtcdCerts(node, bundle),
            # The runtime restarts a service whose spec (trust bundles included) changed.
            StartEtcd(node, cluster, trust=trust),
            WaitEtcdHealthy([node.address], ask=[leader.address] if leader else []),
        ]
        super().__init__("etcd-restart", [node.address], steps)


class EtcdRenewCertsOp(StepOperator):
    """Renew the leaf certificates of running members in place: new files, same process.

    etcd 3.5 loads its certificate and key files at every new TLS connection (client
    and peer listeners; measured, see the README), so no member restarts and no
    quorum rule is involved. Every certificate is issued before any file is written.
    """

    def __init__(self, nodes: list[Node], reasons: dict[str, list[str]]) -> None:
        self.nodes = nodes
        self.reasons = reasons
        bundle = CertBundle()
        detail = "; ".join(f"{a}: {', '.join(r)}" for a, r in sorted(reasons.items()))[:500]
        steps: list[Commander] = [IssueEtcdCerts(nodes, bundle, _ALL_TRUST_IN_SPEC, detail)]
        steps += [WriteEtcdCerts(n, bundle) for n in nodes]
        super().__init__("etcd-renew-certificates", [n.address for n in nodes], steps)


# The trust bundles of a running member are its spec's business; renewal writes leaves only.
_ALL_TRUST_IN_SPEC = Trust(bundles={ca: "" for _, ca in TRUST_BUNDLE_FILES})


class EtcdDefragOp(StepOperator):
    """Defragment one member whose database is fragmented, then wait until it answers
    again; the decision takes the members one at a time, followers first."""

    needs_vault = False  # the etcd API with cke's own client certificate

    def __init__(self, member: EtcdMember, ask: list[str]) -> None:
        self.member = member
        steps: list[Commander] = [
            DefragmentMember(member),
            WaitEtcdHealthy([member.address], ask=ask),
        ]
        super().__init__("etcd-defrag", [member.address], steps)


class EtcdNospaceRecoveryOp(StepOperator):
    """The NOSPACE alarm is raised (writes are refused): compact the history to the
    current revision, defragment every member given (in that order: followers first,
    the leader last), waiting for each to answer before the next, then disarm."""

    needs_vault = False  # as defragmentation: writes must not wait for Vault

    def __init__(self, members: list[EtcdMember], via: list[str]) -> None:
        self.members = members
        steps: list[Commander] = [CompactEtcd(via)]
        for m in members:
            others = [a for a in via if a != m.address]
            steps += [DefragmentMember(m), WaitEtcdHealthy([m.address], ask=others)]
        steps.append(DisarmAlarm(via, ALARM_NOSPACE))
        super().__init__("etcd-nospace-recovery", [m.address for m in members], steps)
