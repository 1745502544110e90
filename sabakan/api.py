"""sabakan's REST API (aiohttp): JSON everywhere, errors as ``{"error": "..."}``."""

from __future__ import annotations

import ipaddress
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from etcd3aio import EtcdError
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from cke import __version__
from cke.common.logs import get_logger
from sabakan.model import (
    MAX_BODY_BYTES,
    InputError,
    Machine,
    MachineState,
    TransitionError,
    now,
    parse_label_pairs,
    parse_label_value,
    parse_labels,
    parse_log_time,
    parse_machines,
    parse_retire_date,
    parse_state,
    parse_state_body,
)
from sabakan.storage import Actor, ConflictError, NotFoundError, Storage, rpc_status

log = get_logger("sabakan.api")

STORAGE_KEY = web.AppKey("storage", Storage)
LEADER_KEY: web.AppKey[dict[str, Any]] = web.AppKey("leader", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
ALLOW_KEY: web.AppKey[list[Net]] = web.AppKey("allow", list)

FILTERS: dict[str, Callable[[Machine], list[str]]] = {
    "serial": lambda m: [m.spec.serial],
    "rack": lambda m: [str(m.spec.rack)],
    "role": lambda m: [m.spec.role],
    "ipv4": lambda m: m.spec.ipv4,
    "ipv6": lambda m: m.spec.ipv6,
    "bmc-type": lambda m: [m.spec.bmc.type],
    "state": lambda m: [m.status.state.value],
}


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Upstream sabakan's metric names and labels (``sabakan_machine_status``,
    ``sabakan_api_request_count``), plus a latency histogram and ``sabakan_leader``,
    which upstream does not have."""

    API_REQUEST_COUNT = "sabakan_api_request_count"

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.machine_status = Gauge(
            "sabakan_machine_status",
            "The machine status: 1 for the state a machine is in, 0 for the others",
            ["status", "address", "serial", "rack", "role", "machine_type"],
            registry=self.registry,
        )
        # Upstream's name has no ``_total``; prometheus_client would add one to a
        # Counter, so this counter is kept here and written out by ``expose``.
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.latency = Histogram(
            "sabakan_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "sabakan_leader", "1 when this replica holds the election", registry=self.registry
        )

    def count_request(self, code: int, path: str, verb: str) -> None:
        self.requests[(str(code), path, verb)] += 1

    def observe_machines(self, machines: list[Machine]) -> None:
        self.machine_status.clear()
        for m in machines:
            spec = m.spec
            address = spec.ipv4[0] if spec.ipv4 else ""
            labels = (address, spec.serial, str(spec.rack), spec.role)
            machine_type = spec.labels.get("machine-type", "")
            for state in MachineState:
                value = 1 if state is m.status.state else 0
                self.machine_status.labels(state.value, *labels, machine_type).set(value)

    def expose(self) -> bytes:
        name = self.API_REQUEST_COUNT
        lines = [
            f"# HELP {name} The total count of API calls.\n",
            f"# TYPE {name} counter\n",
        ]
        for (code, path, verb), n in sorted(self.requests.items()):
            lines.append(
                f'{name}{{code="{_escape(code)}",path="{_escape(path)}",'
                f'verb="{_escape(verb)}"}} {n}\n'
            )
        return generate_latest(self.registry) + "".join(lines).encode()


METRICS_KEY = web.AppKey("metrics", Metrics)


def _actor(request: web.Request) -> Actor:
    ip = request.remote or ""
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    if peer:
        for rdn in peer.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return Actor(user=str(value), ip=ip)
    return Actor(user=request.headers.get("X-Sabakan-User", "unknown")[:128], ip=ip)


def _allowed(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    if peer:  # only present when the TLS handshake verified it against the client CA
        return True
    try:
        ip = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(ip in net for net in request.app[ALLOW_KEY])


# Reads that need the same credentials as a mutation: the audit log names users and
# addresses and holds every before/after.
PROTECTED_READS = frozenset({"/api/v1/logs"})


def _etcd_rpc_error(request: web.Request, code: str, detail: str) -> web.Response:
    """A gRPC status etcd3aio passes through (it maps only auth and transient codes)."""
    if "too large" in detail or code == "RESOURCE_EXHAUSTED":
        log.error("etcd refused a large request", path=request.path, error=detail)
        return error(
            413,
            "(body): the write is larger than etcd accepts (its --max-request-bytes); "
            "send fewer machines or labels per request",
        )
    log.error("etcd error", path=request.path, code=code, error=detail)
    return error(503, f"etcd: {code}")


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.body_exists:  # also a chunked one: over the limit is a 413 everywhere
            await request.read()  # (kept: the handler's read() gets the same bytes)
        return await handler(request)
    except InputError as exc:
        return error(400, str(exc))
    except NotFoundError as exc:
        return error(404, str(exc))
    except (ConflictError, TransitionError) as exc:
        return error(409, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"(body): a request body may have at most {MAX_BODY_BYTES} bytes")
    except web.HTTPException as exc:
        return error(exc.status, exc.reason)
    except EtcdError as exc:
        log.error("etcd error", path=request.path, error=str(exc))
        return error(503, f"etcd: {exc}")
    except Exception as exc:  # never a traceback to the client
        status = rpc_status(exc)
        if status is not None:
            return _etcd_rpc_error(request, *status)
        log.error("internal error", path=request.path, error=f"{type(exc).__name__}: {exc}")
        return error(500, "internal error (see the server log)")


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    start = time.perf_counter()
    status = 500
    try:
        mutation = request.method not in ("GET", "HEAD", "OPTIONS")
        if (mutation or route in PROTECTED_READS) and not _allowed(request):
            what = "mutation" if mutation else "reading the audit log"
            log.warning(f"refused {what}", remote=request.remote, path=request.path)
            resp: web.StreamResponse = error(401, f"{what} not allowed from this client")
        elif request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            resp = error(413, f"(body): a request body may have at most {MAX_BODY_BYTES} bytes")
        else:
            resp = await _handle(request, handler)
        status = resp.status
        return resp
    finally:
        # path: the route (``/api/v1/state/{serial}``), not the raw path upstream
        # counts, so that the number of series stays bounded.
        metrics.count_request(status, route, request.method)
        metrics.latency.labels(request.method, route).observe(time.perf_counter() - start)
        if route.startswith("/api/"):
            # Who asked: the client certificate's CN (cke reads the machines as "cke").
            actor = _actor(request)
            log.info(
                "request",
                method=request.method,
                path=request.path[:200],
                status=status,
                user=actor.user,
                remote=actor.ip,
            )


def _match(machine: Machine, query: dict[str, list[str]]) -> bool:
    for name, values in query.items():
        negate = name.startswith("without-")
        key = name[len("without-") :] if negate else name
        if key == "labels":
            found = any(
                all(machine.spec.labels.get(k) == v for k, v in parse_label_pairs(text).items())
                for text in values
            )
        else:
            wanted = {v for text in values for v in text.split(",") if v}
            found = bool(wanted & set(FILTERS[key](machine)))
        if found == negate:
            return False
    return True


async def get_machines(request: web.Request) -> web.Response:
    query: dict[str, list[str]] = {}
    for name, value in request.query.items():
        key = name[len("without-") :] if name.startswith("without-") else name
        if key not in FILTERS and key != "labels":
            raise InputError(f"{name}: unknown query parameter")
        if key == "state":
            for s in value.split(","):
                parse_state(s)
        if key == "labels":
            parse_label_pairs(value)
        query.setdefault(name, []).append(value)
    machines = await request.app[STORAGE_KEY].list_machines()
    at = now()
    body = [m.to_api(at) for m in machines if _match(m, query)]
    body.sort(key=lambda d: d["spec"]["serial"])
    return web.json_response(body)


async def post_machines(request: web.Request) -> web.Response:
    inputs = parse_machines(await request.read())
    machines = await request.app[STORAGE_KEY].register(inputs, _actor(request))
    log.info("machines registered", serials=[m.spec.serial for m in machines])
    return web.json_response([m.to_api() for m in machines], status=201)


async def delete_machine(request: web.Request) -> web.Response:
    serial = request.match_info["serial"]
    await request.app[STORAGE_KEY].delete(serial, _actor(request))
    log.info("machine deleted", serial=serial)
    return web.json_response({})


async def get_state(request: web.Request) -> web.Response:
    machine, _ = await request.app[STORAGE_KEY].get(request.match_info["serial"])
    return web.Response(text=machine.status.state.value, content_type="text/plain")


async def put_state(request: web.Request) -> web.Response:
    serial = request.match_info["serial"]
    target = parse_state_body(await request.read())
    actor = _actor(request)
    machine = await request.app[STORAGE_KEY].set_state(serial, target, actor)
    log.info("state changed", serial=serial, state=target.value, user=actor.user)
    return web.json_response(machine.to_api())


async def put_retire_date(request: web.Request) -> web.Response:
    date = parse_retire_date(await request.read())
    storage = request.app[STORAGE_KEY]
    machine = await storage.set_retire_date(request.match_info["serial"], date, _actor(request))
    return web.json_response(machine.to_api())


async def delete_retire_date(request: web.Request) -> web.Response:
    storage = request.app[STORAGE_KEY]
    machine = await storage.set_retire_date(request.match_info["serial"], None, _actor(request))
    return web.json_response(machine.to_api())


async def put_labels(request: web.Request) -> web.Response:
    labels = parse_labels(await request.read())
    storage = request.app[STORAGE_KEY]
    machine = await storage.put_labels(request.match_info["serial"], labels, _actor(request))
    return web.json_response(machine.to_api())


async def put_label(request: web.Request) -> web.Response:
    """Upstream's form: one label, its value the raw body."""
    serial, key = request.match_info["serial"], request.match_info["label"]
    labels = parse_label_value(key, await request.read())
    machine = await request.app[STORAGE_KEY].put_labels(serial, labels, _actor(request))
    return web.json_response(machine.to_api())


async def delete_label(request: web.Request) -> web.Response:
    storage = request.app[STORAGE_KEY]
    serial, key = request.match_info["serial"], request.match_info["label"]
    machine = await storage.delete_label(serial, key, _actor(request))
    return web.json_response(machine.to_api())


async def get_logs(request: web.Request) -> web.Response:
    for name in request.query:
        if name not in ("since", "until"):
            raise InputError(f"{name}: unknown query parameter")
    since = parse_log_time(request.query["since"], "since") if "since" in request.query else None
    until = parse_log_time(request.query["until"], "until") if "until" in request.query else None
    records = await request.app[STORAGE_KEY].logs(since, until)
    text = "".join(json.dumps(r) + "\n" for r in records)
    return web.Response(text=text, content_type="application/json")


async def get_health(request: web.Request) -> web.Response:
    try:
        await request.app[STORAGE_KEY].kv.get(request.app[STORAGE_KEY].index_key, timeout=2)
    except EtcdError as exc:
        return error(503, f"etcd: {exc}")
    leader: dict[str, Any] = request.app[LEADER_KEY]
    return web.json_response({"health": "healthy", "leader": bool(leader.get("leader"))})


async def get_version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def get_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    try:
        metrics.observe_machines(await request.app[STORAGE_KEY].list_machines())
    except EtcdError as exc:
        log.warning("metrics: cannot list machines", error=str(exc))
    metrics.leader.set(1 if request.app[LEADER_KEY].get("leader") else 0)
    resp = web.Response(body=metrics.expose())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def make_app(
    storage: Storage, allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> web.Application:
    app = web.Application(middlewares=[middleware], client_max_size=MAX_BODY_BYTES)
    app[STORAGE_KEY] = storage
    app[ALLOW_KEY] = allow
    app[METRICS_KEY] = Metrics()
    status: dict[str, Any] = {"leader": False}
    app[LEADER_KEY] = status
    r = app.router
    r.add_get("/api/v1/machines", get_machines)
    r.add_post("/api/v1/machines", post_machines)
    r.add_delete("/api/v1/machines/{serial}", delete_machine)
    r.add_get("/api/v1/state/{serial}", get_state)
    r.add_put("/api/v1/state/{serial}", put_state)
    r.add_put("/api/v1/retire-date/{serial}", put_retire_date)
    r.add_delete("/api/v1/retire-date/{serial}", delete_retire_date)
    r.add_put("/api/v1/labels/{serial}", put_labels)
    # {label:.+}: a label name may hold a '/' (``prefix/name``).
    r.add_put("/api/v1/labels/{serial}/{label:.+}", put_label)
    r.add_delete("/api/v1/labels/{serial}/{label:.+}", delete_label)
    r.add_get("/api/v1/logs", get_logs)
    r.add_get("/version", get_version)
    r.add_get("/health", get_health)
    r.add_get("/metrics", get_metrics)
    return app


def all_states() -> list[str]:
    return [s.value for s in MachineState]
