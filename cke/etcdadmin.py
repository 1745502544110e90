"""The etcd API of the cluster cke manages (not cke's own etcd): status and membership.

One client per member endpoint, so that each member's own view (leader, raft index)
is read from it, and membership changes go to a member that answers. cke
authenticates with a ``root`` client certificate from Vault (CN-based auth).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import AlarmType, Etcd3Client, EtcdError, PermissionType, prefix_range_end

from cke.common.logs import get_logger
from cke.server.clusterstatus import ALARM_NOSPACE, EtcdMember, EtcdStatus

log = get_logger("cke.etcdadmin")

STATUS_TIMEOUT = 2.0


@dataclass(frozen=True)
class EtcdCredentials:
    server_ca: bytes  # CA of the members' serving certificates (cke/ca-server)
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)


def _channel_of(client: Etcd3Client) -> grpc.aio.Channel | None:
    # etcd3aio keeps its one gRPC channel private; its connectivity is all we read.
    channel = getattr(client, "_channel", None)
    return channel if isinstance(channel, grpc.aio.Channel) else None


async def _until_not_ready(channel: grpc.aio.Channel, address: str) -> str:
    state = grpc.ChannelConnectivity.READY
    while state == grpc.ChannelConnectivity.READY:
        await channel.wait_for_state_change(state)
        state = channel.get_state()
    return address


class MemberAnswer(NamedTuple):
    """One member's maintenance Status."""

    address: str
    member_id: int
    leader_id: int
    raft_applied_index: int
    db_size: int
    db_size_in_use: int


def _is_nospace_error(error: str) -> bool:
    """etcd lists the cluster's alarms among every member's status errors
    (``memberID:123 alarm:NOSPACE``): NOSPACE says nothing of this member's health."""
    return error.strip().endswith("alarm:" + ALARM_NOSPACE)


def endpoint(address: str, port: int = 2379) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def peer_address(peer_url: str) -> str:
    """The host of a member's peer URL ("" when etcd reports one that does not parse)."""
    try:
        return urlsplit(peer_url).hostname or ""
    except ValueError:
        return ""


class EtcdAdmin:
    def __init__(
        self, credentials: Callable[[], Awaitable[EtcdCredentials]], port: int = 2379
    ) -> None:
        self._credentials = credentials
        self.port = port  # the members' client port (CKE's: 2379)
        self._clients: dict[str, tuple[EtcdCredentials, Etcd3Client]] = {}

    async def client(self, address: str) -> Etcd3Client:
        creds = await self._credentials()
        cached = self._clients.get(address)
        if cached is not None and cached[0] == creds:
            return cached[1]
        if cached is not None:
            with contextlib.suppress(Exception):
                await cached[1].close()
        c = Etcd3Client(
            [endpoint(address, self.port)],
            ca_cert=creds.server_ca,
            cert_key=creds.key,
            cert_chain=creds.cert,
            rpc_max_attempts=1,
        )
        await c.connect()
        self._clients[address] = (creds, c)
        return c

    async def wait_for_a_drop(self, addresses: Iterable[str]) -> str:
        """Wait until the connection to one of these members drops; return its address.

        A cheap watch, no request: each member's gRPC channel (kept open by ``status``)
        changes its connectivity state the moment the member's process dies (its kernel
        closes the socket), so a killed member is noticed in milliseconds instead of at
        the next ``--interval``. A member whose channel is not connected now is not
        watched (it is down already, or was not asked yet); returns never if none is.
        """
        watches = []
        for address in sorted(set(addresses)):
            cached = self._clients.get(address)
            channel = _channel_of(cached[1]) if cached is not None else None
            if channel is not None and channel.get_state() == grpc.ChannelConnectivity.READY:
                watches.append(asyncio.create_task(_until_not_ready(channel, address)))
        if not watches:
            await asyncio.Event().wait()  # nothing to watch: until cancelled
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for task in watches:
                task.cancel()
            await asyncio.gather(*watches, return_exceptions=True)

    async def _forget(self, address: str) -> None:
        """Drop the client of a member that did not answer. Its gRPC channel would wait out
        a reconnect backoff that grows to minutes while the member is down, failing every
        request meanwhile: a member back up would look down for that long. A new client
        dials at once."""
        cached = self._clients.pop(address, None)
        if cached is not None:
            with contextlib.suppress(Exception):
                await cached[1].close()

    async def close(self) -> None:
        for _, c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()
        self._clients.clear()

    async def _member_status(self, address: str) -> MemberAnswer | None:
        """What the member says of itself, or None if it did not answer."""
        try:
            c = await self.client(address)
            assert c.maintenance is not None
            st = await c.maintenance.status(timeout=STATUS_TIMEOUT)
        except (EtcdError, OSError, TimeoutError):
            await self._forget(address)
            return None
        except Exception as exc:  # one member's surprise must not hide the others
            log.warning(
                "etcd member status failed", member=address, error=f"{type(exc).__name__}: {exc}"
            )
            await self._forget(address)
            return None
        if not all(_is_nospace_error(e) for e in st.errors):
            return None  # no leader, or an alarm other than NOSPACE (CORRUPT)
        return MemberAnswer(
            address,
            int(st.header.member_id),
            int(st.leader),
            int(st.raftAppliedIndex),
            int(st.dbSize),
            int(st.dbSizeInUse),
        )

    async def status(self, addresses: Iterable[str]) -> EtcdStatus:
        """Membership from any member that answers; health and raft index from each."""
        candidates = sorted(set(addresses))
        answers = await asyncio.gather(*(self._member_status(a) for a in candidates))
        alive = {a[1]: a for a in answers if a is not None}
        members_resp = None
        for answer in answers:
            if answer is None:
                continue
            try:
                c = await self.client(answer[0])
                assert c.cluster is not None
                members_resp = await c.cluster.member_list(timeout=STATUS_TIMEOUT)
                break
            except Exception as exc:
                log.debug("etcd member list failed", member=answer[0], error=str(exc))
                continue
        if members_resp is None:
            return EtcdStatus(reachable=False)
        leaders = {a[2] for a in alive.values() if a[2]}
        leader_id = leaders.pop() if len(leaders) == 1 else None
        members = []
        for m in members_resp.members:
            mid = int(m.ID)
            answer = alive.get(mid)
            members.append(
                EtcdMember(
                    id=mid,
                    name=m.name,
                    address=peer_address(m.peerURLs[0]) if m.peerURLs else "",
                    learner=bool(m.isLearner),
                    healthy=answer is not None,
                    raft_index=answer[3] if answer else 0,
                    leader=mid == leader_id,
                    peer_urls=tuple(m.peerURLs),
                    db_size=answer.db_size if answer else 0,
                    db_size_in_use=answer.db_size_in_use if answer else 0,
                )
            )
        alarms = await self._alarms([a.address for a in alive.values()])
        return EtcdStatus(
            reachable=True, members=tuple(members), leader_id=leader_id, alarms=alarms
        )

    async def _any(self, addresses: Iterable[str]) -> Etcd3Client:
        for address in sorted(set(addresses)):
            if await self._member_status(address) is not None:
                return await self.client(address)
        raise EtcdError("no etcd member answers")

    async def member_add(self, via: Iterable[str], peer_url: str, learner: bool = True) -> int:
        c = await self._any(via)
        assert c.cluster is not None
        current = await c.cluster.member_list(timeout=5)
        for m in current.members:
            if peer_url in m.peerURLs:
                return int(m.ID)  # added before a leader change: keep it
        resp = await c.cluster.member_add([peer_url], is_learner=learner, timeout=10)
        return int(resp.member.ID)

    async def _leader(self, via: Iterable[str]) -> Etcd3Client:
        """The client of the member that leads (according to the members asked)."""
        answers = [a for a in await asyncio.gather(*(self._member_status(x) for x in via)) if a]
        for address, member_id, leader_id, *_ in answers:
            if member_id == leader_id:
                return await self.client(address)
        raise EtcdError("no etcd leader among " + ",".join(sorted(set(via))))

    async def member_promote(self, via: Iterable[str], member_id: int) -> None:
        # Sent to the leader itself: etcd 3.5 loses the caller's identity when a
        # follower forwards a promotion with auth on ("auth: user name is empty").
        c = await self._leader(list(via))
        assert c.cluster is not None
        await c.cluster.member_promote(member_id, timeout=10)

    async def member_remove(self, via: Iterable[str], member_id: int) -> None:
        c = await self._any(via)
        assert c.cluster is not None
        current = await c.cluster.member_list(timeout=5)
        if member_id not in {int(m.ID) for m in current.members}:
            return  # removed already
        await c.cluster.member_remove(member_id, timeout=10)

    async def move_leader(self, leader_address: str, target_id: int) -> None:
        c = await self.client(leader_address)
        assert c.maintenance is not None
        await c.maintenance.move_leader(target_id, timeout=10)

    async def setup_auth(self, via: Iterable[str]) -> bool:
        """Users ``root`` and ``kube-apiserver`` (``/registry/`` only), then auth on.

        Returns False when auth was on already. Idempotent step by step.
        """
        c = await self._any(via)
        assert c.auth is not None
        if (await c.auth.auth_status(timeout=5)).enabled:
            return False
        users = set((await c.auth.user_list(timeout=5)).users)
        roles = set((await c.auth.role_list(timeout=5)).roles)
        if "root" not in roles:
            await c.auth.role_add("root", timeout=5)
        if "root" not in users:
            await c.auth.user_add("root", no_password=True, timeout=5)
            await c.auth.user_grant_role("root", "root", timeout=5)
        await self.user_add_with(c, "kube-apiserver", "/registry/")
        await c.auth.auth_enable(timeout=10)
        return True

    async def user_add(self, via: Iterable[str], user: str, prefix: str) -> None:
        await self.user_add_with(await self._any(via), user, prefix)

    @staticmethod
    async def user_add_with(c: Etcd3Client, user: str, prefix: str) -> None:
        """A user (no password: certificate CN) and a same-named role limited to ``prefix``."""
        assert c.auth is not None
        users = set((await c.auth.user_list(timeout=5)).users)
        roles = set((await c.auth.role_list(timeout=5)).roles)
        if user not in roles:
            await c.auth.role_add(user, timeout=5)
            await c.auth.role_grant_permission(
                user,
                prefix,
                prefix_range_end(prefix.encode()),
                perm_type=PermissionType.READWRITE,
                timeout=5,
            )
        if user not in users:
            await c.auth.user_add(user, no_password=True, timeout=5)
            await c.auth.user_grant_role(user, user, timeout=5)

    # -- hygiene: alarms, compaction, defragmentation ----------------------------------------

    async def _alarms(self, addresses: Iterable[str]) -> tuple[tuple[int, str], ...]:
        """The cluster's alarms from the first member that lists them (none when none do:
        the status stays usable, and the next round asks again)."""
        for address in sorted(set(addresses)):
            try:
                c = await self.client(address)
                assert c.maintenance is not None
                resp = await c.maintenance.alarms(timeout=STATUS_TIMEOUT)
            except Exception as exc:
                log.debug("etcd alarm list failed", member=address, error=str(exc))
                continue
            return tuple(sorted((int(a.memberID), _alarm_name(int(a.alarm))) for a in resp.alarms))
        return ()

    async def defragment(self, address: str, timeout: float) -> None:
        """Defragment one member's backend (it serves nothing meanwhile)."""
        c = await self.client(address)
        assert c.maintenance is not None
        await c.maintenance.defragment(timeout=timeout, max_attempts=1)

    async def compact(self, via: Iterable[str], timeout: float) -> int:
        """Compact the history up to the current revision (physically: freed pages are
        free when this returns); returns that revision. Already compacted is fine."""
        c = await self._any(via)
        assert c.maintenance is not None and c.kv is not None
        revision = int((await c.maintenance.status(timeout=STATUS_TIMEOUT)).header.revision)
        try:
            await c.kv.compact(revision, physical=True, timeout=timeout, max_attempts=1)
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            # etcd3aio passes OUT_OF_RANGE ("required revision has been compacted") as is.
            if "compacted" not in str(exc):
                raise
        return revision

    async def disarm(self, via: Iterable[str], alarm: str) -> int:
        """Deactivate every ``alarm`` listed (etcd deactivates one member's alarm per
        request, as ``etcdctl alarm disarm`` does); returns how many were disarmed."""
        c = await self._any(via)
        assert c.maintenance is not None
        listed = await c.maintenance.alarms(timeout=STATUS_TIMEOUT)
        disarmed = 0
        for a in listed.alarms:
            kind = int(a.alarm)
            if _alarm_name(kind) != alarm:
                continue
            await c.maintenance.alarm_deactivate(
                AlarmType(kind), member_id=int(a.memberID), timeout=STATUS_TIMEOUT
            )
            disarmed += 1
        return disarmed


def _alarm_name(kind: int) -> str:
    try:
        return AlarmType(kind).name
    except ValueError:
        return str(kind)
