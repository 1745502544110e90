"""The sabakan integration as the leader runs it: settings -> machines -> generation -> store.

Each round in which the decision has nothing to do (as CKE's integrator runs when the
cluster is idle), the leader reads the ``sabakan/...`` settings, asks sabakan for its
machines over HTTPS (verifying sabakan's certificate, presenting cke's client
certificate), and runs the pure generator (:func:`cke.sabakan.generate`).  A new
cluster passes exactly the checks of ``ckecli cluster set`` (``validate_cluster`` and
``keep-etcd-majority`` against the current voters) and is stored by a fenced
transaction that also checks the cluster was not changed since it was read.  What
happened (generated, unchanged, refused and by which rule, or why sabakan could not be
used) is returned as a :class:`GenerationReport` for ``ckecli status`` and the metrics;
any failure keeps the current cluster.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError

from cke.cluster import (
    Cluster,
    ClusterError,
    Constraints,
    cluster_from_json,
    cluster_to_json,
    constraints_from_json,
    validate_cluster,
)
from cke.common.etcd import format_validation_error
from cke.common.logs import error_line, get_logger
from cke.sabakan.generator import Generated, generate, machine_address
from cke.sabakan.rules import Refusal, template_role
from cke.sabakan.settings import (
    SabakanTLS,
    SettingError,
    parse_template,
    parse_url,
    parse_variables,
    select_machines,
    tls_from_json,
)
from cke.server.safety import check_control_plane_change
from cke.storage import (
    KEY_SABAKAN_DISABLED,
    KEY_SABAKAN_QUERY_VARIABLES,
    KEY_SABAKAN_TEMPLATE,
    KEY_SABAKAN_TLS,
    KEY_SABAKAN_URL,
    LeaderKey,
    Storage,
    UnreadableValue,
    now_rfc3339,
    stored_text,
)
from sabakan.model import Machine

log = get_logger("cke.sabakan")

QUERY_TIMEOUT = 10.0
# sabakan's answer is read up to this size (about 2,000 bytes a machine).
MAX_ANSWER_BYTES = 64 * 1024 * 1024

RESULT_GENERATED = "generated"
RESULT_UNCHANGED = "unchanged"
RESULT_REFUSED = "refused"
RESULT_ERROR = "error"


class SabakanUnavailable(Exception):
    """sabakan could not be asked, or its answer cannot be used."""


@dataclass(frozen=True)
class GenerationReport:
    """The last generation, as ``ckecli status`` shows it."""

    result: str
    timestamp: str = field(default_factory=now_rfc3339)
    changes: tuple[str, ...] = ()
    rule: str = ""
    reason: str = ""
    held: tuple[str, ...] = ()
    workers_by_role: dict[str, int] = field(default_factory=dict)
    unused_machines: int = 0

    @property
    def successful(self) -> bool:
        return self.result in (RESULT_GENERATED, RESULT_UNCHANGED)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"result": self.result, "timestamp": self.timestamp}
        if self.changes:
            doc["changes"] = list(self.changes)
        if self.rule:
            doc["rule"] = self.rule
        if self.reason:
            doc["reason"] = self.reason
        if self.held:
            doc["held"] = list(self.held)
        return doc


@dataclass(frozen=True)
class Enabled:
    """The settings of an enabled integration, parsed."""

    url: str
    template: Cluster
    variables_text: str | None
    tls: SabakanTLS


def enabled_settings(values: dict[str, bytes]) -> Enabled | None:
    """The settings when the integration runs (not disabled, URL and template set), else
    None; SettingError names a stored setting that cannot be used."""
    try:
        disabled = stored_text(values.get(KEY_SABAKAN_DISABLED), KEY_SABAKAN_DISABLED)
        url = stored_text(values.get(KEY_SABAKAN_URL), KEY_SABAKAN_URL)
        template = stored_text(values.get(KEY_SABAKAN_TEMPLATE), KEY_SABAKAN_TEMPLATE)
        variables = stored_text(
            values.get(KEY_SABAKAN_QUERY_VARIABLES), KEY_SABAKAN_QUERY_VARIABLES
        )
        tls = stored_text(values.get(KEY_SABAKAN_TLS), KEY_SABAKAN_TLS)
    except UnreadableValue as exc:
        raise SettingError(str(exc)) from None
    if disabled == "true" or url is None or template is None:
        return None
    parse_variables(variables)  # refuse now rather than at every query
    return Enabled(parse_url(url), parse_template(template), variables, tls_from_json(tls))


def machine_from_api(doc: Any) -> Machine:
    """One machine of ``GET /api/v1/machines`` (sabakan's API form) as the model."""
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    spec, status = doc.get("spec"), doc.get("status")
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise ValueError("want spec and status objects")
    spec = dict(spec)
    if spec.get("retire-date") == "":
        spec["retire-date"] = None
    status = {k: v for k, v in status.items() if k != "duration"}
    return Machine.model_validate({"spec": spec, "status": status})


def machines_from_answer(body: bytes) -> list[Machine]:
    try:
        docs = json.loads(body)
    except (ValueError, RecursionError):
        raise SabakanUnavailable("sabakan's answer is not JSON") from None
    if not isinstance(docs, list):
        raise SabakanUnavailable("sabakan's answer is not a list of machines")
    machines = []
    for i, doc in enumerate(docs):
        try:
            machines.append(machine_from_api(doc))
        except ValidationError as exc:
            problem = format_validation_error(exc)
            raise SabakanUnavailable(f"sabakan's machine [{i}]: {problem}"[:300]) from None
        except ValueError as exc:
            raise SabakanUnavailable(f"sabakan's machine [{i}]: {exc}"[:300]) from None
    return machines


def ssl_context(tls: SabakanTLS) -> ssl.SSLContext:
    """Verify sabakan with ``tls.ca`` (else the system's CAs); present the client
    certificate if there is one.  The key passes through a 0600 file in a private
    directory for the few microseconds ``load_cert_chain`` needs it."""
    ctx = ssl.create_default_context(cadata=tls.ca) if tls.ca else ssl.create_default_context()
    if tls.cert is not None and tls.key is not None:
        with tempfile.TemporaryDirectory(prefix="cke-sabakan-") as private:
            os.chmod(private, 0o700)
            cert_path = os.path.join(private, "client.crt")
            key_path = os.path.join(private, "client.key")
            for path, text in ((cert_path, tls.cert), (key_path, tls.key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            ctx.load_cert_chain(cert_path, key_path)
    return ctx


class SabakanClient:
    """Asks sabakan for its machines; one TLS context per TLS setting."""

    def __init__(self) -> None:
        self._ctx: tuple[SabakanTLS, ssl.SSLContext] | None = None
        # The last answer, kept for the rest of the leader's round: the generator and
        # auto-repair both read the machines, and sabakan is asked once.
        self._answer: tuple[str, SabakanTLS, list[Machine]] | None = None

    def new_round(self) -> None:
        """Forget the last answer: the next :meth:`machines` asks sabakan again."""
        self._answer = None

    def _context(self, tls: SabakanTLS) -> ssl.SSLContext:
        if self._ctx is None or self._ctx[0] != tls:
            self._ctx = (tls, ssl_context(tls))
        return self._ctx[1]

    async def machines(self, url: str, tls: SabakanTLS) -> list[Machine]:
        if self._answer is not None and self._answer[:2] == (url, tls):
            return list(self._answer[2])
        try:
            ctx = self._context(tls)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise SabakanUnavailable(f"TLS settings: {error_line(exc)}") from None
        timeout = aiohttp.ClientTimeout(total=QUERY_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(f"{url}/api/v1/machines", ssl=ctx) as resp,
            ):
                body = await resp.content.read(MAX_ANSWER_BYTES + 1)
                if resp.status != 200:
                    raise SabakanUnavailable(f"sabakan answered HTTP {resp.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            what = type(exc).__name__
            raise SabakanUnavailable(f"cannot query sabakan ({what}: {error_line(exc)})") from None
        if len(body) > MAX_ANSWER_BYTES:
            raise SabakanUnavailable(f"sabakan's answer is over {MAX_ANSWER_BYTES} bytes")
        machines = machines_from_answer(body)
        self._answer = (url, tls, machines)
        return list(machines)


def _workers_by_role(cluster: Cluster, machines: list[Machine]) -> dict[str, int]:
    role_of = {machine_address(m): m.spec.role for m in machines}
    counts: dict[str, int] = {}
    for node in cluster.workers:
        role = role_of.get(node.address) or template_role(node.labels) or ""
        counts[role] = counts.get(role, 0) + 1
    return counts


def _unused(cluster: Cluster, machines: list[Machine]) -> int:
    used = {n.address for n in cluster.nodes}
    return sum(1 for m in machines if machine_address(m) not in used)


class Integrator:
    """One generation per call; the leader calls it when the decision has nothing to do."""

    def __init__(self, storage: Storage, client: SabakanClient | None = None) -> None:
        self.storage = storage
        self.client = client or SabakanClient()

    async def run(self, leader: LeaderKey | None, voters: list[str]) -> GenerationReport | None:
        """Generate and store; None when the integration is not enabled. Without a
        ``leader`` (``cke --debug-sabakan``) nothing is stored: the report says what a
        leader would store."""
        try:
            settings = enabled_settings(await self.storage.get_sabakan())
        except SettingError as exc:
            return GenerationReport(RESULT_ERROR, reason=f"settings: {exc}")
        if settings is None:
            return None
        try:
            listed = await self.client.machines(settings.url, settings.tls)
        except SabakanUnavailable as exc:
            log.warning("sabakan unavailable; the cluster is kept", error=str(exc))
            return GenerationReport(RESULT_ERROR, reason=str(exc))
        machines = select_machines(listed, parse_variables(settings.variables_text))

        current_raw = await self.storage.get_cluster()
        constraints_raw = await self.storage.get_constraints()
        try:
            constraints = constraints_from_json(stored_text(constraints_raw.value, "constraints"))
            current_text = stored_text(current_raw.value, "cluster")
            current = cluster_from_json(current_text) if current_text else None
        except (ClusterError, UnreadableValue) as exc:
            # Generation starts from the stored cluster: a damaged one is not replaced
            # by a fresh generation, which could drop every member.
            return GenerationReport(RESULT_ERROR, reason=f"stored configuration: {exc}")

        result = generate(machines, settings.template, current, constraints)
        if isinstance(result, Refusal):
            log.warning("sabakan: generation refused", rule=result.rule, reason=result.reason)
            return GenerationReport(RESULT_REFUSED, rule=result.rule, reason=result.reason)
        return await self._store(
            leader, result, current_raw.mod_revision, constraints, voters, machines
        )

    async def _store(
        self,
        leader: LeaderKey | None,
        result: Generated,
        revision: int,
        constraints: Constraints,
        voters: list[str],
        machines: list[Machine],
    ) -> GenerationReport:
        held = tuple(f"{h.rule}: {h.reason}" for h in result.held)
        extra: dict[str, Any] = {
            "held": held,
            "workers_by_role": _workers_by_role(result.cluster, machines),
            "unused_machines": _unused(result.cluster, machines),
        }
        if not result.changed:
            return GenerationReport(RESULT_UNCHANGED, **extra)
        # Exactly the checks of ``ckecli cluster set``.
        try:
            validate_cluster(result.cluster, constraints)
        except ClusterError as exc:
            return GenerationReport(RESULT_REFUSED, rule="valid-cluster", reason=str(exc), **extra)
        refused = check_control_plane_change(voters, result.cluster)
        if refused is not None:
            return GenerationReport(
                RESULT_REFUSED, rule=refused.rule, reason=refused.message, **extra
            )
        if leader is None:
            return GenerationReport(RESULT_GENERATED, changes=result.changes, **extra)
        stored = await self.storage.put_generated_cluster(
            leader, cluster_to_json(result.cluster), revision
        )
        if not stored:
            return GenerationReport(
                RESULT_ERROR, reason="the cluster changed while generating; trying again", **extra
            )
        for change in result.changes:
            log.info("sabakan: cluster generated", change=change)
        return GenerationReport(RESULT_GENERATED, changes=result.changes, **extra)
