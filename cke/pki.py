"""Certificates from Vault's PKI: the CAs cke uses and every certificate it issues.

``ckecli vault init`` creates the mounts and roles below (CKE's ``docs/vault.md``);
``CertIssuer`` is the one place that asks Vault for a certificate, so SANs, key
usages and TTLs are decided here and nowhere else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cke.common.durations import parse_duration

if TYPE_CHECKING:  # annotations only: ckecli's commands that never ask Vault start faster
    import hvac

    from cke.vault import Vault

ROOT_TTL = "876000h"  # 100 years: the roots are replaced by hand, never by expiry
DEFAULT_CERT_TTL = "8760h"
SYSTEM_MAX_TTL = "87600h"  # the cap of roles cke issues with (its --cert-ttl)
ROOT_CLIENT_TTL = "2h"
USER_CLIENT_TTL = "8760h"  # ``ckecli etcd issue``'s default and its role's cap
# Expired certificates are kept this long before tidy removes them, at most: cke makes
# it as short as its longest leaf lifetime (at least a minute), so that short
# lifetimes do not pile up thousands of expired certificates in Vault.
TIDY_SAFETY_BUFFER = "72h"
KEY_TYPE = "ec"
KEY_BITS = 256
SECRETS_MOUNT = "cke/secrets"
SECRET_PATHS = ("ssh", "k8s")  # SSH keys of nodes, the Kubernetes encryption key
POLICY_NAME = "cke"
APPROLE_NAME = "cke"
# etcd users cke issues certificates for itself (CN = etcd user); never for an operator.
SYSTEM_ETCD_USERS = ("cke", "kube-apiserver")
RESERVED_ETCD_USERS = ("root", *SYSTEM_ETCD_USERS)


def reserved_etcd_user_problem(user: str) -> str | None:
    """Why ``user`` may not be an operator's etcd user (None: it may)."""
    if not user:
        return "must not be empty"
    if user in RESERVED_ETCD_USERS or user.startswith("system:"):
        return f"{', '.join(RESERVED_ETCD_USERS)} and system: names are reserved"
    if user != user.strip():
        return "must not start or end with white space"
    return None


@dataclass(frozen=True)
class Role:
    """A PKI role. ``names``: the only CNs it issues (empty: any name);
    ``denied_names``: CNs the cke policy refuses on this role's issue path (OpenBao's
    PKI roles cannot express "any name but these", its ACL policies can)."""

    name: str
    server: bool
    client: bool
    max_ttl: str = SYSTEM_MAX_TTL
    organization: str = ""
    ttl: str = DEFAULT_CERT_TTL
    names: tuple[str, ...] = ()
    denied_names: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "allow_any_name": True,
            "enforce_hostnames": False,
            "allow_ip_sans": True,
            "allow_localhost": True,
            "server_flag": self.server,
            "client_flag": self.client,
            "key_type": KEY_TYPE,
            "key_bits": KEY_BITS,
            "max_ttl": self.max_ttl,
            "ttl": self.ttl,
            "no_store": False,
        }
        if self.names:
            params |= {
                "allow_any_name": False,
                "allowed_domains": list(self.names),
                "allow_bare_domains": True,
                "allow_subdomains": False,
                "allow_glob_domains": False,
                "allow_wildcard_certificates": False,
                "allow_localhost": False,
                "allow_ip_sans": False,
            }
        if self.organization:
            params["organization"] = self.organization
        return params


@dataclass(frozen=True)
class CASpec:
    name: str  # the name ``ckecli ca get|set`` takes, and ``ca/<name>`` in etcd
    mount: str
    common_name: str
    roles: tuple[Role, ...] = field(default_factory=tuple)


CAS: tuple[CASpec, ...] = (
    CASpec("server", "cke/ca-server", "cke server CA", (Role("system", True, False),)),
    CASpec("etcd-peer", "cke/ca-etcd-peer", "cke etcd peer CA", (Role("system", True, True),)),
    CASpec(
        "etcd-client",
        "cke/ca-etcd-client",
        "cke etcd client CA",
        (
            Role("system", False, True, names=SYSTEM_ETCD_USERS),
            Role(
                "admin", False, True, max_ttl=ROOT_CLIENT_TTL, ttl=ROOT_CLIENT_TTL, names=("root",)
            ),
            Role(
                "user",
                False,
                True,
                max_ttl=USER_CLIENT_TTL,
                ttl=USER_CLIENT_TTL,
                denied_names=(*RESERVED_ETCD_USERS, "system:*"),
            ),
        ),
    ),
    CASpec(
        "kubernetes",
        "cke/ca-kubernetes",
        "cke kubernetes CA",
        (
            Role("system", True, True),
            Role("node", False, True, organization="system:nodes"),
            Role("admin", False, True, organization="system:masters"),
        ),
    ),
    CASpec(
        "kubernetes-aggregation",
        "cke/ca-kubernetes-aggregation",
        "cke kubernetes aggregation CA",
        (Role("system", False, True),),
    ),
    CASpec(
        "kubernetes-webhook",
        "cke/ca-kubernetes-webhook",
        "cke kubernetes webhook CA",
        (Role("system", True, False),),
    ),
)
CA_BY_NAME = {ca.name: ca for ca in CAS}
# The CAs whose mounts the cke token may add root issuers to and switch the default
# issuer of (CA rotation, ``cke.pkiissuers``).
ROTATABLE_CAS = ("server", "etcd-peer", "etcd-client")


def _hcl_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def issuer_policy(mount: str) -> str:
    """What ``cke.pkiissuers`` needs on ``mount``: add a root issuer, read and set the default.

    Listing issuers and reading their certificates (``issuers``, ``issuer/<id>/json``)
    are unauthenticated in OpenBao's PKI, so they need no grant. A new root must be
    named, internal (``exported`` would hand out its key) and of cke's key type;
    ``key_bits`` is matched as the string ``"256"`` (ACL parameter values compare by
    type), so that is what ``ensure_issuer`` sends. ``config/issuers`` may only set the
    default issuer, not ``default_follows_latest_issuer``.
    """
    return (
        f'path "{mount}/root/generate/internal" {{\n'
        '  capabilities = ["update"]\n'
        '  required_parameters = ["issuer_name"]\n'
        "  allowed_parameters = {\n"
        '    "issuer_name" = []\n'
        '    "common_name" = []\n'
        '    "ttl" = []\n'
        f'    "key_type" = ["{KEY_TYPE}"]\n'
        f'    "key_bits" = ["{KEY_BITS}"]\n'
        "  }\n}\n"
        f'path "{mount}/config/issuers" {{\n'
        '  capabilities = ["read", "update"]\n'
        '  allowed_parameters = {\n    "default" = []\n  }\n}\n'
    )


def cke_policy() -> str:
    """The ``cke`` policy: exactly what cke and ckecli do with the AppRole token.

    Issue with each role ``vault init`` creates (never ``sign``, which takes the CN
    from a CSR), tidy each PKI mount, rotate the CAs in ``ROTATABLE_CAS``
    (``issuer_policy``), and read/write the two secrets. Token lookup and renewal
    come from Vault's ``default`` policy.
    """
    blocks = []
    for ca in CAS:
        for role in ca.roles:
            denied = ""
            if role.denied_names:
                denied = (
                    "\n  denied_parameters = {\n"
                    f'    "common_name" = {_hcl_list(role.denied_names)}\n  }}'
                )
            blocks.append(
                f'path "{ca.mount}/issue/{role.name}" {{\n  capabilities = ["update"]{denied}\n}}\n'
            )
        blocks.append(f'path "{ca.mount}/tidy" {{\n  capabilities = ["update"]\n}}\n')
        if ca.name in ROTATABLE_CAS:
            blocks.append(issuer_policy(ca.mount))
    for secret in SECRET_PATHS:
        blocks.append(
            f'path "{SECRETS_MOUNT}/{secret}" {{\n'
            '  capabilities = ["create", "read", "update"]\n}\n'
        )
    return "".join(blocks)


POLICY = cke_policy()


@dataclass(frozen=True)
class IssuedCert:
    certificate: str
    private_key: str = field(repr=False)
    ca_certificate: str
    serial: str

    def to_json_dict(self) -> dict[str, str]:
        """The shape ``ckecli etcd root-issue`` prints (CKE's)."""
        return {
            "ca_certificate": self.ca_certificate,
            "certificate": self.certificate,
            "private_key": self.private_key,
        }


def _shorter(a: str, b: str) -> str:
    """The shorter of two durations (Vault's syntax)."""
    return a if parse_duration(a) <= parse_duration(b) else b


def service_ip(service_subnet: str) -> str:
    """The kubernetes service's cluster IP: the first address of the service subnet."""
    network = ipaddress.ip_network(service_subnet, strict=False)
    return str(network.network_address + 1)


class CertIssuer:
    """Issues every certificate cke needs; TTLs can be set per kind."""

    def __init__(self, vault: Vault, ttls: dict[str, str] | None = None) -> None:
        self.vault = vault
        self.ttls = {
            "server": DEFAULT_CERT_TTL,
            "peer": DEFAULT_CERT_TTL,
            "client": DEFAULT_CERT_TTL,
            "kubernetes": DEFAULT_CERT_TTL,
        }
        self.ttls.update(ttls or {})

    async def _issue(
        self,
        mount: str,
        role: str,
        common_name: str,
        ttl: str,
        dns: list[str] | None = None,
        ips: list[str] | None = None,
    ) -> IssuedCert:
        params: dict[str, Any] = {"ttl": ttl, "exclude_cn_from_sans": True}
        if dns:
            params["alt_names"] = ",".join(dict.fromkeys(dns))
        if ips:
            params["ip_sans"] = ",".join(dict.fromkeys(ips))

        def issue(client: hvac.Client) -> IssuedCert:
            data = client.secrets.pki.generate_certificate(
                name=role, common_name=common_name, extra_params=params, mount_point=mount
            )["data"]
            return IssuedCert(
                data["certificate"], data["private_key"], data["issuing_ca"], data["serial_number"]
            )

        return await self.vault.call(issue, write=True)

    @staticmethod
    def _node_names(address: str, hostname: str) -> tuple[list[str], list[str]]:
        dns = ["localhost"] + ([hostname] if hostname else [])
        return dns, [address, "127.0.0.1"]

    async def etcd_server(self, address: str, hostname: str = "") -> IssuedCert:
        dns, ips = self._node_names(address, hostname)
        return await self._issue(
            "cke/ca-server", "system", hostname or address, self.ttls["server"], dns, ips
        )

    async def etcd_peer(self, address: str, hostname: str = "") -> IssuedCert:
        dns, ips = self._node_names(address, hostname)
        return await self._issue(
            "cke/ca-etcd-peer", "system", hostname or address, self.ttls["peer"], dns, ips
        )

    async def etcd_client(self, user: str, ttl: str | None = None) -> IssuedCert:
        """A client certificate whose CN is the etcd user (``root``, ``cke``, ...)."""
        if user == "root":
            # The admin role caps root certificates at ROOT_CLIENT_TTL.
            ttl = ROOT_CLIENT_TTL if ttl is None else _shorter(ttl, ROOT_CLIENT_TTL)
            return await self._issue("cke/ca-etcd-client", "admin", "root", ttl)
        if user in SYSTEM_ETCD_USERS:
            return await self._issue(
                "cke/ca-etcd-client", "system", user, ttl or self.ttls["client"]
            )
        return await self.etcd_user(user, ttl)

    async def etcd_user(self, user: str, ttl: str | None = None) -> IssuedCert:
        """An operator's etcd user (``ckecli etcd issue``), always through the ``user``
        role: Vault refuses the reserved names there and caps the TTL."""
        return await self._issue("cke/ca-etcd-client", "user", user, ttl or USER_CLIENT_TTL)

    async def kube_apiserver(
        self,
        address: str,
        hostname: str,
        service_subnet: str,
        cluster_domain: str = "cluster.local",
    ) -> IssuedCert:
        dns = [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{cluster_domain}",
            "localhost",
        ]
        if hostname:
            dns.append(hostname)
        ips = [service_ip(service_subnet), address, "127.0.0.1"]
        return await self._issue(
            "cke/ca-kubernetes", "system", "kubernetes", self.ttls["kubernetes"], dns, ips
        )

    async def kube_component(self, component: str) -> IssuedCert:
        """Client certificates of control-plane components (CN ``system:<component>``)."""
        if component not in ("kube-controller-manager", "kube-scheduler", "kube-proxy"):
            raise ValueError(f"unknown component {component!r}")
        return await self._issue(
            "cke/ca-kubernetes", "system", f"system:{component}", self.ttls["kubernetes"]
        )

    async def kubelet(self, address: str, hostname: str) -> IssuedCert:
        name = hostname or address
        return await self._issue(
            "cke/ca-kubernetes",
            "node",
            f"system:node:{name}",
            self.ttls["kubernetes"],
            [name],
            [address],
        )

    async def kube_admin(self, ttl: str = "2h") -> IssuedCert:
        return await self._issue("cke/ca-kubernetes", "admin", "admin", ttl)

    async def tidy(self, safety_buffer: str = TIDY_SAFETY_BUFFER) -> list[str]:
        """Tidy certificates that expired more than ``safety_buffer`` ago, in every PKI
        mount (CKE does it hourly)."""
        tidied = []
        for ca in CAS:

            def tidy(client: hvac.Client, mount: str = ca.mount) -> None:
                client.secrets.pki.tidy(
                    extra_params={
                        "tidy_cert_store": True,
                        "tidy_revoked_certs": True,
                        "safety_buffer": safety_buffer,
                    },
                    mount_point=mount,
                )

            await self.vault.call(tidy, write=True)
            tidied.append(ca.mount)
        return tidied
