"""The federation's PKI with real keys and certificates, and a real TLS 1.3 handshake on loopback."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fedsilo import certs
from fedsilo.cli import app
from fedsilo.errors import EX_CONFIG, CertificateRefused, ConfigError

CA = tuple[Path, Path]


def make_ca(directory: Path, name: str = "fedsilo federation CA") -> CA:
    return certs.init_ca(directory, name)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path / "ca")


def silo_cert(
    ca: CA, directory: Path, rank: int, not_before: dt.datetime | None = None, days: int = certs.CERT_DAYS
) -> x509.Certificate:
    _, cert = certs.issue(directory, *ca, "silo", rank, not_before=not_before, days=days)
    return certs.load_certificate(cert)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the CA and the request/sign flow ---------------------------------------------------------------------------


def test_init_makes_a_ca_that_signs_members_only(ca: CA) -> None:
    cert = certs.load_certificate(ca[0])
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.verify_directly_issued_by(cert)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1"
    assert mode(ca[1]) == 0o600 and mode(ca[0]) == 0o644


def test_request_and_sign_bind_the_rank(ca: CA, tmp_path: Path) -> None:
    key_path, csr_path = certs.request(tmp_path / "site", "silo", 3, "St Mary")
    out = certs.sign(csr_path, *ca, rank=3)
    cert, authority = certs.load_certificate(out), certs.load_certificate(ca[0])

    assert out == tmp_path / "site" / "silo-3.pem"
    assert certs.rank_of(cert) == 3
    cert.verify_directly_issued_by(authority)
    assert certs.check_peer(cert, authority, expected_rank=3) == 3
    site_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(site_key, ec.EllipticCurvePrivateKey)
    assert certs.fingerprint(cert.public_key()) == certs.fingerprint(site_key.public_key())
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "St Mary"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        == authority.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )


def test_the_site_key_is_private_and_not_in_the_request(tmp_path: Path) -> None:
    key_path, csr_path = certs.request(tmp_path, "silo", 1)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = csr_path.read_bytes()
    assert mode(key_path) == 0o600
    assert b"PRIVATE" not in csr
    secret = key.private_numbers().private_value.to_bytes(32, "big")
    assert secret not in x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_sign_refuses_a_rank_mismatch(ca: CA, tmp_path: Path) -> None:
    _, csr_path = certs.request(tmp_path, "silo", 3)
    with pytest.raises(ConfigError, match=r"asks for rank 3, but --rank 2 was given; refusing to sign$"):
        certs.sign(csr_path, *ca, rank=2)
    assert not csr_path.with_suffix(".pem").exists()


def test_sign_refuses_a_request_for_another_role(ca: CA, tmp_path: Path) -> None:
    _, csr_path = certs.request(tmp_path, "aggregator")
    with pytest.raises(ConfigError, match=r"is for the aggregator, not a silo; pass --role aggregator"):
        certs.sign(csr_path, *ca)
    out = certs.sign(csr_path, *ca, role="aggregator", hosts=["agg.example.org"])
    assert certs.check_peer(certs.load_certificate(out), certs.load_certificate(ca[0]), role="aggregator") == 0


def handmade_request(tmp_path: Path, common_name: str, uris: list[str]) -> Path:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if uris:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    path = tmp_path / "handmade.csr"
    path.write_bytes(
        builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    return path


@pytest.mark.parametrize(
    "common_name, uris, expected",
    [
        ("fedsilo-silo-3", [], "carries no fedsilo identity"),
        ("fedsilo-silo-3", ["fedsilo://silo/3", "fedsilo://silo/4"], "carries 2 fedsilo identities"),
        (
            "fedsilo-silo-2",
            ["fedsilo://silo/3"],
            "has subject CN fedsilo-silo-2, but its identity fedsilo://silo/3 needs",
        ),
        ("fedsilo-silo-0", ["fedsilo://silo/0"], "unknown fedsilo identity 'fedsilo://silo/0'"),
    ],
    ids=["no-rank", "two-ranks", "cn-disagrees", "rank-0"],
)
def test_sign_refuses_a_request_without_one_clear_rank(
    ca: CA, tmp_path: Path, common_name: str, uris: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        certs.sign(handmade_request(tmp_path, common_name, uris), *ca)


def test_sign_refuses_a_ca_key_that_does_not_match(tmp_path: Path) -> None:
    first, second = make_ca(tmp_path / "a"), make_ca(tmp_path / "b")
    _, csr_path = certs.request(tmp_path, "silo", 1)
    with pytest.raises(ConfigError, match=r"CA key .* does not belong to CA certificate"):
        certs.sign(csr_path, first[0], second[1])


def test_files_are_not_overwritten_without_force(ca: CA, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^refusing to overwrite .*ca.pem, .*ca.key \(pass --force to replace\)$"):
        make_ca(ca[0].parent)
    before = ca[1].read_bytes()
    certs.init_ca(ca[0].parent, force=True)
    assert ca[1].read_bytes() != before and mode(ca[1]) == 0o600

    key_path, _ = certs.request(tmp_path, "silo", 1)
    key = key_path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        certs.request(tmp_path, "silo", 1)
    assert key_path.read_bytes() == key


# --- what a certificate binds, and what check_peer refuses --------------------------------------------------------


def test_the_aggregator_certificate_names_its_hosts(ca: CA, tmp_path: Path) -> None:
    _, path = certs.issue(tmp_path, *ca, "aggregator", hosts=["Agg.Example.org", "10.0.0.5"])
    cert = certs.load_certificate(path)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [certs.AGGREGATOR_URI]
    assert certs.check_peer(cert, certs.load_certificate(ca[0]), role="aggregator") == 0
    with pytest.raises(CertificateRefused, match="is the aggregator's; it binds no silo rank"):
        certs.rank_of(cert)
    with pytest.raises(ConfigError, match="an aggregator certificate needs --host"):
        certs.issue(tmp_path / "other", *ca, "aggregator")


def test_a_certificate_for_rank_2_cannot_join_as_rank_3(ca: CA, tmp_path: Path) -> None:
    cert = silo_cert(ca, tmp_path, 2)
    with pytest.raises(CertificateRefused) as refused:
        certs.check_peer(cert, certs.load_certificate(ca[0]), expected_rank=3)
    assert str(refused.value) == "certificate binds rank 2, not 3"


def test_a_silo_certificate_cannot_serve_as_the_aggregator(ca: CA, tmp_path: Path) -> None:
    with pytest.raises(CertificateRefused, match="is for a silo, not the aggregator$"):
        certs.check_peer(silo_cert(ca, tmp_path, 1), certs.load_certificate(ca[0]), role="aggregator")


def test_rank_of_refuses_an_ambiguous_certificate(ca: CA, tmp_path: Path) -> None:
    ca_cert = certs.load_certificate(ca[0])
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier("fedsilo://silo/2"),
        x509.UniformResourceIdentifier("FEDSILO://silo/3"),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsilo-silo-2")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(
        CertificateRefused, match=r"carries 2 fedsilo identities \(fedsilo://silo/2, FEDSILO://silo/3\)"
    ):
        certs.rank_of(cert)


@pytest.mark.parametrize("same_name", [True, False], ids=["same-name", "other-name"])
def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, same_name: bool) -> None:
    ours = make_ca(tmp_path / "ours")
    theirs = make_ca(tmp_path / "theirs", "fedsilo federation CA" if same_name else "someone else")
    cert = silo_cert(theirs, tmp_path, 1)
    with pytest.raises(CertificateRefused, match=r"was not issued by the federation CA \(CN=fedsilo federation CA\)$"):
        certs.check_peer(cert, certs.load_certificate(ours[0]))


def test_expired_and_not_yet_valid_certificates_are_refused(ca: CA, tmp_path: Path) -> None:
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    cert = silo_cert(ca, tmp_path, 1, not_before=start, days=1)
    authority = certs.load_certificate(ca[0])
    with pytest.raises(CertificateRefused, match=r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC$"):
        certs.check_peer(cert, authority)
    with pytest.raises(CertificateRefused, match="is not valid before"):
        certs.check_peer(cert, authority, now=start - dt.timedelta(hours=1))
    assert certs.check_peer(cert, authority, now=start + dt.timedelta(hours=1)) == 1


def test_a_certificate_never_outlives_its_ca(ca: CA, tmp_path: Path) -> None:
    cert = silo_cert(ca, tmp_path, 1, days=100_000)
    assert cert.not_valid_after_utc == certs.load_certificate(ca[0]).not_valid_after_utc


# --- revocation ---------------------------------------------------------------------------------------------------


def write_crl(ca: CA, serials: list[int], path: Path, encoding: serialization.Encoding) -> Path:
    ca_cert = certs.load_certificate(ca[0])
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=7))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(encoding))
    return path


def write_text(serials: list[int], path: Path) -> Path:
    path.write_text(
        f"# revoked by the operator\n\n12345  # a decimal one\n{hex(serials[0])}\n"
        + "".join(f"0X{s:X}\n" for s in serials[1:])
    )
    return path


@pytest.mark.parametrize("kind", ["text", "pem-crl", "der-crl"])
def test_a_revoked_serial_is_refused(ca: CA, tmp_path: Path, kind: str) -> None:
    revoked_cert, other = silo_cert(ca, tmp_path / "a", 1), silo_cert(ca, tmp_path / "b", 2)
    serials = [revoked_cert.serial_number, 0x1F]
    path = {
        "text": lambda: write_text(serials, tmp_path / "revoked.txt"),
        "pem-crl": lambda: write_crl(ca, serials, tmp_path / "crl.pem", serialization.Encoding.PEM),
        "der-crl": lambda: write_crl(ca, serials, tmp_path / "crl.der", serialization.Encoding.DER),
    }[kind]()
    revoked = certs.load_revoked(path)

    assert set(serials) <= revoked and (kind != "text" or revoked == {*serials, 12345})
    assert certs.is_revoked(revoked_cert, revoked) and not certs.is_revoked(other, revoked)
    authority = certs.load_certificate(ca[0])
    with pytest.raises(CertificateRefused) as refused:
        certs.check_peer(revoked_cert, authority, revoked)
    assert str(refused.value) == f"certificate serial {hex(revoked_cert.serial_number)} is revoked"
    assert certs.check_peer(other, authority, revoked) == 2


@pytest.mark.parametrize(
    "content, expected",
    [
        ("12\nAB12\n", r"line 2: 'AB12' is not a serial \(decimal, or hex with 0x\)$"),
        ("-5\n", r"line 1: '-5' is not a serial"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is PEM but not a CRL"),
    ],
    ids=["hex-without-0x", "negative", "pem-certificate"],
)
def test_a_bad_revocation_list_is_one_error(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "revoked"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        certs.load_revoked(path)


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_init_request_sign_show(tmp_path: Path) -> None:
    runner = CliRunner()
    operator, site = str(tmp_path / "operator"), str(tmp_path / "site")
    for args in (
        ["init", "--dir", operator],
        ["request", "--rank", "2", "--site", "St Mary", "--dir", site],
        ["sign", f"{site}/silo-2.csr", "--rank", "2", "--dir", operator, "--days", "30"],
    ):
        result = runner.invoke(app, ["certs", *args])
        assert result.exit_code == 0, result.output

    cert = certs.load_certificate(tmp_path / "site" / "silo-2.pem")
    assert certs.check_peer(cert, certs.load_certificate(tmp_path / "operator" / "ca.pem"), expected_rank=2) == 2
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)
    shown = runner.invoke(app, ["certs", "show", f"{site}/silo-2.pem"])
    assert shown.exit_code == 0, shown.output
    assert "rank:       2\n" in shown.stdout and f"serial:     {hex(cert.serial_number)}\n" in shown.stdout
    assert f"key sha256: {certs.fingerprint(cert.public_key())}" in shown.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sign", "{tmp}/missing.csr", "--dir", "{tmp}/ca"], "certificate request {tmp}/missing.csr does not exist"),
        (
            ["sign", "{tmp}/silo-3.csr", "--rank", "4", "--dir", "{tmp}/ca"],
            "certificate request {tmp}/silo-3.csr asks for rank 3, but --rank 4 was given; refusing to sign",
        ),
        (
            ["request", "--rank", "three", "--dir", "{tmp}"],
            "invalid option '--rank': expected a whole number (got 'three')",
        ),
        (
            ["request", "--rank", "0", "--dir", "{tmp}/x"],
            "a silo's rank is 1..K (rank 0 is the aggregator), got --rank 0",
        ),
        (["request", "--dir", "{tmp}/x"], "a silo certificate needs --rank R (1..K)"),
        (
            ["issue", "--role", "nurse", "--dir", "{tmp}/ca"],
            "invalid option '--role': expected silo or aggregator (got 'nurse')",
        ),
        (
            ["issue", "--rank", "1", "--host", "agg", "--dir", "{tmp}/ca"],
            "--host is for the aggregator's certificate; a silo is known by its rank",
        ),
        (
            ["init", "--dir", "{tmp}/ca"],
            "refusing to overwrite {tmp}/ca/ca.pem, {tmp}/ca/ca.key (pass --force to replace)",
        ),
        (["init", "--days", "0", "--dir", "{tmp}/new"], "invalid option '--days': must be at least 1 (got '0')"),
        (["show", "{tmp}/ca/ca.key"], "certificate {tmp}/ca/ca.key is not a PEM certificate"),
    ],
    ids=[
        "missing-csr",
        "rank-mismatch",
        "rank-not-a-number",
        "rank-0",
        "no-rank",
        "unknown-role",
        "host-for-a-silo",
        "overwrite",
        "days-0",
        "show-a-key",
    ],
)
def test_cli_bad_input_is_one_line(ca: CA, tmp_path: Path, args: list[str], expected: str) -> None:
    certs.request(tmp_path, "silo", 3)
    result = CliRunner().invoke(app, ["certs", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == EX_CONFIG, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedsilo: error: {expected.format(tmp=tmp_path)}"), lines


# --- TLS 1.3 on loopback ------------------------------------------------------------------------------------------


Outcome = tuple[x509.Certificate | BaseException | None, BaseException | None]


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str) -> Outcome:
    """One connection over 127.0.0.1: (what the server saw: the client's certificate or its error, the client's
    error or None). With TLS 1.3 a client learns that the server refused its certificate only on its first read."""
    seen: list[x509.Certificate | BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                with server.wrap_socket(connection, server_side=True) as tls:
                    seen.append(certs.peer_certificate(tls))
                    tls.sendall(b"ok")
            except OSError as exc:
                seen.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        client_error: BaseException | None = None
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                assert tls.version() == "TLSv1.3"
                if tls.recv(2) != b"ok":
                    raise ConnectionError("the server closed the connection")
        except OSError as exc:
            client_error = exc
        thread.join(10)
    return (seen[0] if seen else None), client_error


Federation = Callable[[str], tuple[Path, Path, Path]]


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    """(key, certificate, CA) for 'aggregator', 'silo-3', or 'stranger' (a silo from another CA)."""
    ours, theirs = make_ca(tmp_path / "ours"), make_ca(tmp_path / "theirs")
    members = {
        "aggregator": (certs.issue(tmp_path / "agg", *ours, "aggregator", hosts=["localhost", "127.0.0.1"]), ours),
        "silo-3": (certs.issue(tmp_path / "site", *ours, "silo", 3), ours),
        "stranger": (certs.issue(tmp_path / "stranger", *theirs, "silo", 3), ours),
    }
    return lambda who: (*members[who][0], members[who][1][0])


def test_tls_handshake_authenticates_both_sides(federation: Federation) -> None:
    agg_key, agg_cert, ca = federation("aggregator")
    silo_key, silo_cert_path, _ = federation("silo-3")
    seen, client_error = handshake(
        certs.server_context(agg_cert, agg_key, ca), certs.client_context(silo_cert_path, silo_key, ca), "localhost"
    )
    assert client_error is None
    assert isinstance(seen, x509.Certificate)
    assert certs.rank_of(seen) == 3
    assert certs.check_peer(seen, certs.load_certificate(ca), expected_rank=3) == 3


def test_tls_refuses_a_silo_from_another_ca(federation: Federation) -> None:
    agg_key, agg_cert, ca = federation("aggregator")
    key, cert, _ = federation("stranger")
    seen, client_error = handshake(
        certs.server_context(agg_cert, agg_key, ca), certs.client_context(cert, key, ca), "localhost"
    )
    assert isinstance(seen, ssl.SSLError) and "certificate verify failed" in str(seen)
    assert client_error is not None


@pytest.mark.parametrize(
    "server_name, server_role, expected",
    [
        ("agg.elsewhere.org", "aggregator", "Hostname mismatch"),
        ("localhost", "silo-3", "certificate purpose"),
    ],
    ids=["wrong-name", "silo-posing-as-aggregator"],
)
def test_tls_silo_checks_the_aggregator(
    federation: Federation, server_name: str, server_role: str, expected: str
) -> None:
    server_key, server_cert, ca = federation(server_role)
    silo_key, silo_cert_path, _ = federation("silo-3")
    _, client_error = handshake(
        certs.server_context(server_cert, server_key, ca),
        certs.client_context(silo_cert_path, silo_key, ca),
        server_name,
    )
    assert isinstance(client_error, ssl.SSLCertVerificationError) and expected in str(client_error)


def test_tls_context_with_a_mismatched_key_is_one_error(federation: Federation) -> None:
    agg_key, _, ca = federation("aggregator")
    _, silo_cert_path, _ = federation("silo-3")
    with pytest.raises(ConfigError, match=r"^cannot load TLS certificate .*silo-3.pem with key .*aggregator.key: "):
        certs.client_context(silo_cert_path, agg_key, ca)
