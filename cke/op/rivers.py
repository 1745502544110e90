"""rivers and etcd-rivers on the nodes (CKE's ``op/rivers_*``): specs and operations.

As in CKE: ``rivers`` runs on every node, listening on ``127.0.0.1:16443`` and
forwarding to the control planes' ``:6443`` (the kube-apiservers); ``etcd-rivers``
runs on the control planes, listening on ``127.0.0.1:12379`` and forwarding to the
members' ``:2379``. rivers does not terminate TLS: clients verify the members (or
apiservers) themselves.

cke ships rivers itself: the single-file app built by :mod:`rivers.zipapp` (standard
library only) is a file of the spec, written to ``binaries.rivers`` (mode 0755, run by
its ``#!/usr/bin/env python3`` line), so a node needs nothing but Python 3.11 and the
app's digest is part of the spec's: a new rivers makes every node's rivers outdated.

Not CKE's: the upstream list is the desired control planes that are etcd voters (a
new control plane appears once its member is promoted; a dropped one leaves the
lists when the configuration drops it, before its member is removed: rule
``rivers-updated-first``), and a node whose address is a loopback address (a test bed
whose nodes share the host's loopback) listens on its own address instead of
127.0.0.1.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cke.cluster import Cluster, Node, ServiceParams
from cke.nodes.runtime import NodeFile, ServiceSpec
from cke.op.base import Commander, OpContext, Parallel
from cke.op.etcd import StepOperator, _Command, run_script_on, tools
from rivers.zipapp import build_zipapp

RIVERS = "rivers"
ETCD_RIVERS = "etcd-rivers"


@dataclass(frozen=True)
class RiversKind:
    service: str
    listen_port: int
    upstream_port: int
    control_planes_only: bool
    # /metrics and /health, on the listen host (loopback): not CKE's (its rivers has none).
    metrics_port: int

    def params(self, cluster: Cluster) -> ServiceParams:
        options = cluster.options
        return options.etcd_rivers if self.service == ETCD_RIVERS else options.rivers


RIVERS_KIND = RiversKind(RIVERS, 16443, 6443, control_planes_only=False, metrics_port=16444)
ETCD_RIVERS_KIND = RiversKind(
    ETCD_RIVERS, 12379, 2379, control_planes_only=True, metrics_port=12380
)
KINDS = (RIVERS_KIND, ETCD_RIVERS_KIND)


@functools.cache
def rivers_app() -> bytes:
    """The rivers zipapp (deterministic: the same bytes in every cke of one version).
    Read once by the server, which hands it to the decision in the status."""
    return build_zipapp()


def listen_host(node: Node) -> str:
    """127.0.0.1, or the node's own address when that is a loopback address (nodes that
    share one loopback cannot all listen on 127.0.0.1)."""
    try:
        loopback = ipaddress.ip_address(node.address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return "127.0.0.1"
    return f"[{node.address}]" if ":" in node.address else node.address


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def rivers_spec(
    kind: RiversKind, node: Node, upstreams: Sequence[str], cluster: Cluster, app: bytes
) -> ServiceSpec:
    params = kind.params(cluster)
    host = listen_host(node)
    args = (
        f"--listen={host}:{kind.listen_port}",
        "--upstreams=" + ",".join(_host_port(a, kind.upstream_port) for a in sorted(upstreams)),
        f"--metrics={host}:{kind.metrics_port}",
        *params.extra_args,  # after ours: an extra --metrics replaces it
    )
    return ServiceSpec(
        kind.service,
        cluster.binaries.rivers,
        args,
        tuple(sorted(params.extra_env.items())),
        files=(NodeFile(cluster.binaries.rivers, app, 0o755),),
    )


class StartRivers(_Command):
    def __init__(
        self,
        kind: RiversKind,
        node: Node,
        upstreams: Sequence[str],
        cluster: Cluster,
        app: bytes,
    ) -> None:
        super().__init__(f"start-{kind.service}", node.address, ",".join(upstreams))
        self.spec = rivers_spec(kind, node, upstreams, cluster, app)
        self.node = node

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        await run_script_on(t.pool, self.node, t.runtime.start_script(self.spec))


class StopRivers(_Command):
    def __init__(self, kind: RiversKind, node: Node) -> None:
        super().__init__(f"stop-{kind.service}", node.address)
        self.service = kind.service
        self.node = node

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        await run_script_on(t.pool, self.node, t.runtime.stop_script(self.service))


class RiversStopOp(StepOperator):
    """Stop etcd-rivers on nodes that are no longer control planes (CKE does it when it
    stops a control plane's services)."""

    def __init__(self, kind: RiversKind, nodes: list[Node]) -> None:
        self.kind = kind
        self.nodes = nodes
        steps: list[Commander] = [Parallel([StopRivers(kind, n) for n in nodes])]
        super().__init__(f"{kind.service}-stop", [n.address for n in nodes], steps)


class RiversOp(StepOperator):
    """Start stopped or restart outdated rivers (one kind) on a bounded set of nodes.

    Named as CKE names them: ``<kind>-bootstrap`` when every target is stopped, else
    ``<kind>-restart``; the runtime restarts a service only if its spec changed.
    """

    def __init__(
        self,
        kind: RiversKind,
        nodes: list[Node],
        upstreams: Sequence[str],
        cluster: Cluster,
        app: bytes,
        bootstrap: bool,
    ) -> None:
        self.kind = kind
        self.nodes = nodes
        self.upstreams = list(upstreams)
        steps: list[Commander] = [
            Parallel([StartRivers(kind, n, upstreams, cluster, app) for n in nodes])
        ]
        name = f"{kind.service}-{'bootstrap' if bootstrap else 'restart'}"
        super().__init__(name, [n.address for n in nodes], steps)
