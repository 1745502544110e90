"""Issue 18: cke's config.yml takes cybozu-go/etcdutil's keys with etcdutil's meaning.

``tls-ca-file``/``tls-cert-file``/``tls-key-file`` are paths; ``tls-ca``/``tls-cert``/
``tls-key`` hold the PEM text; a ``-file`` key wins over its PEM twin.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from cke.common.etcd import ConfigError, EtcdSettings, load_etcd_settings, make_client
from cke.devenv.pki import DevCA
from cke.devenv.replicas import write_cke_config


def _indent(pem: str) -> str:
    return textwrap.indent(pem.strip(), "  ")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA(tmp_path_factory.mktemp("ca"))


def test_upstream_file_keys_are_paths(tmp_path: Path, ca: DevCA) -> None:
    client = ca.issue("etcd-root", "root", server=False)
    path = tmp_path / "config.yml"
    # Shaped as etcdutil's README example.
    path.write_text(
        "endpoints:\n  - https://10.1.2.3:2379\n  - https://10.11.12.13:2379\n"
        'prefix: "/key-prefix/"\ntimeout: "2s"\n'
        'username: "etcd-user-name"\npassword: "etcd-password"\n'
        f'tls-ca-file: "{ca.ca_path}"\n'
        f'tls-cert-file: "{client.cert}"\ntls-key-file: "{client.key}"\n'
    )
    settings = load_etcd_settings(path)
    assert settings.prefix == "/key-prefix/" and settings.timeout == 2.0
    assert settings.username == "etcd-user-name" and settings.password == "etcd-password"
    assert settings.tls_ca_file == str(ca.ca_path) and settings.tls_ca is None
    assert settings.ca_pem() == ca.ca_path.read_bytes()
    assert settings.client_pem() == (client.cert.read_bytes(), client.key.read_bytes())
    make_client(settings)  # builds without reading anything else


def test_upstream_pem_keys_hold_the_text(tmp_path: Path, ca: DevCA) -> None:
    client = ca.issue("etcd-root", "root", server=False)
    ca_pem, cert_pem, key_pem = (
        ca.ca_path.read_text(),
        client.cert.read_text(),
        client.key.read_text(),
    )
    path = tmp_path / "config.yml"
    path.write_text(
        "endpoints:\n  - https://10.1.2.3:2379\n"
        f"tls-ca: |\n{_indent(ca_pem)}\n"
        f"tls-cert: |\n{_indent(cert_pem)}\n"
        f"tls-key: |\n{_indent(key_pem)}\n"
    )
    settings = load_etcd_settings(path)
    assert settings.uses_tls and settings.tls_ca_file is None
    assert settings.ca_pem() == ca_pem.encode()
    assert settings.client_pem() == (cert_pem.encode(), key_pem.encode())
    # Neither the key nor any PEM text is in the repr (logs, tracebacks).
    assert "PRIVATE KEY" not in repr(settings) and "CERTIFICATE" not in repr(settings)
    make_client(settings)


def test_file_key_wins_over_pem_text(tmp_path: Path, ca: DevCA) -> None:
    other = DevCA(tmp_path / "other")
    settings = EtcdSettings.model_validate(
        {"tls-ca-file": str(ca.ca_path), "tls-ca": other.ca_path.read_text()}
    )
    assert settings.ca_pem() == ca.ca_path.read_bytes()


@pytest.mark.parametrize("key", ["tls-ca", "tls-cert", "tls-key"])
def test_old_config_with_a_path_under_the_pem_key_says_use_file(tmp_path: Path, key: str) -> None:
    path = tmp_path / "config.yml"
    body = {
        "endpoints": ["https://10.0.0.1:2379"],
        "tls-ca": "/etc/cke/etcd-ca.crt",
        "tls-cert": "/etc/cke/etcd-client.crt",
        "tls-key": "/etc/cke/etcd-client.key",
    }
    # Only ``key`` holds a path; the others are PEM-shaped so that one error shows.
    for other in body:
        if other.startswith("tls-") and other != key:
            body[other] = "-----BEGIN X-----\nAAAA\n-----END X-----\n"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError) as caught:
        load_etcd_settings(path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{key}: " in message and f"use {key}-file" in message


def test_missing_file_is_a_one_line_error_naming_the_key(tmp_path: Path) -> None:
    settings = EtcdSettings.model_validate(
        {"endpoints": ["https://10.0.0.1:2379"], "tls-ca-file": str(tmp_path / "nope.crt")}
    )
    with pytest.raises(ConfigError, match=r"^tls-ca-file: .*nope\.crt"):
        make_client(settings)


def test_https_without_any_ca_is_refused() -> None:
    settings = EtcdSettings.model_validate({"endpoints": ["https://10.0.0.1:2379"]})
    with pytest.raises(ConfigError, match="tls-ca-file"):
        make_client(settings)


def test_certificate_without_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("tls-cert-file: /c.crt\n")
    with pytest.raises(ConfigError, match="tls-key-file"):
        load_etcd_settings(path)


def test_written_config_uses_the_file_keys(tmp_path: Path, ca: DevCA) -> None:
    """The test bed's writer (what the e2e tests hand to cke) round-trips."""
    client = ca.issue("etcd-root", "root", server=False)
    settings = EtcdSettings.model_validate(
        {
            "endpoints": ["https://127.0.0.1:2379"],
            "tls-ca-file": str(ca.ca_path),
            "tls-cert-file": str(client.cert),
            "tls-key-file": str(client.key),
        }
    )
    path = write_cke_config(settings, tmp_path / "config.yml")
    doc = yaml.safe_load(path.read_text())
    assert {"tls-ca-file", "tls-cert-file", "tls-key-file"} <= set(doc)
    assert not {"tls-ca", "tls-cert", "tls-key"} & set(doc)
    assert load_etcd_settings(path) == settings


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[2]
    settings = load_etcd_settings(root / "configs" / "cke.yml")
    assert settings.tls_ca_file == "/etc/cke/etcd-ca.crt"
    assert settings.tls_key_file == "/etc/cke/etcd-client.key"
    sabakan = yaml.safe_load((root / "configs" / "sabakan.yml").read_text())
    etcd = EtcdSettings.model_validate(sabakan["etcd"])
    assert etcd.tls_ca_file == "/etc/sabakan/etcd-ca.crt"
