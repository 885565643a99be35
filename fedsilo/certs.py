"""The federation's X.509 identities: its CA, the members' certificates, and the checks the TLS transport runs.

A silo's certificate is its identity. It binds the silo's rank R twice, as the URI name ``fedsilo://silo/R`` and as
the subject CN ``fedsilo-silo-R``, and the two must agree, so a certificate for rank 2 can never join as rank 3. The
aggregator's certificate carries ``fedsilo://aggregator`` and the DNS names or IP addresses the silos dial.

Keys are EC P-256 (ECDSA with SHA-256): every OpenSSL that speaks TLS 1.3 accepts them, Ed25519 is not as universal.
These are plain functions over paths and ``cryptography`` objects; ``fedsilo certs`` is the command line over them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.errors import CertificateRefused, ConfigError, first_line

Role = Literal["silo", "aggregator"]
ROLES: tuple[Role, ...] = ("silo", "aggregator")
IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
CERT_DAYS = 365
# Certificates start a little in the past: a site whose clock runs slow must not see a fresh one as not yet valid.
CLOCK_SKEW = dt.timedelta(minutes=5)
AGGREGATOR_URI = "fedsilo://aggregator"
_SILO_URI = re.compile(r"fedsilo://silo/([1-9][0-9]*)")
_SERIAL = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_DNS_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_USAGE = {"silo": ExtendedKeyUsageOID.CLIENT_AUTH, "aggregator": ExtendedKeyUsageOID.SERVER_AUTH}
_USAGE_NAME = {"silo": "clientAuth", "aggregator": "serverAuth"}
_WHO = {"silo": "a silo", "aggregator": "the aggregator"}


# --- identities ---------------------------------------------------------------------------------------------------


def _check_identity(role: str, rank: int | None) -> int:
    """The rank a certificate for ``role`` binds: 1..K for a silo, 0 for the aggregator (its rank in the group)."""
    if role == "silo":
        if rank is None:
            raise ConfigError("a silo certificate needs --rank R (1..K)")
        if rank < 1:
            raise ConfigError(f"a silo's rank is 1..K (rank 0 is the aggregator), got --rank {rank}")
        return rank
    if role == "aggregator":
        if rank:
            raise ConfigError("an aggregator certificate takes no --rank")
        return 0
    raise ConfigError(f"unknown role {role!r}: expected silo or aggregator")


def file_stem(role: Role, rank: int) -> str:
    """How a member's files are named: ``silo-3.key``/``silo-3.pem``, ``aggregator.key``/``aggregator.pem``."""
    return f"silo-{rank}" if role == "silo" else "aggregator"


def _uri(role: Role, rank: int) -> str:
    return f"fedsilo://silo/{rank}" if role == "silo" else AGGREGATOR_URI


def _subject(role: Role, rank: int, site: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, f"fedsilo-{file_stem(role, rank)}")]
    if site is not None:
        if not 1 <= len(site) <= 64:
            raise ConfigError(f"--site must be 1 to 64 characters, got {len(site)}")
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, site))
    return x509.Name(attributes)


def _site(name: x509.Name) -> str | None:
    values = [str(a.value) for a in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return values[0] if values else None


def _san(item: x509.Certificate | x509.CertificateSigningRequest) -> x509.SubjectAlternativeName | None:
    try:
        return item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType, ValueError) as exc:
        raise ValueError(f"has malformed extensions ({first_line(exc)})") from None


def _read_identity(item: x509.Certificate | x509.CertificateSigningRequest) -> tuple[Role, int]:
    """(role, rank) from a certificate or request. Raises ValueError with a phrase that completes "certificate X"."""
    san = _san(item)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san else []
    # Counted case-insensitively, so that FEDSILO://silo/3 beside fedsilo://silo/2 reads as ambiguous, not as rank 2.
    ours = [u for u in uris if u.lower().startswith("fedsilo:")]
    if not ours:
        raise ValueError(f"carries no fedsilo identity (no URI name fedsilo://silo/R or {AGGREGATOR_URI})")
    if len(ours) > 1:
        raise ValueError(f"carries {len(ours)} fedsilo identities ({', '.join(ours)}); a member has exactly one")
    match = _SILO_URI.fullmatch(ours[0])
    if match:
        role: Role = "silo"
        rank = int(match[1])
    elif ours[0] == AGGREGATOR_URI:
        role, rank = "aggregator", 0
    else:
        raise ValueError(f"carries an unknown fedsilo identity {ours[0]!r}")
    common_names = [str(a.value) for a in item.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    expected = f"fedsilo-{file_stem(role, rank)}"
    if common_names != [expected]:
        found = ", ".join(common_names) or "none"
        raise ValueError(f"has subject CN {found}, but its identity {ours[0]} needs CN {expected}")
    return role, rank


def _identity_or_refuse(cert: x509.Certificate) -> tuple[Role, int]:
    try:
        return _read_identity(cert)
    except ValueError as exc:
        raise CertificateRefused(f"certificate {cert.subject.rfc4514_string()} {exc}") from None


def rank_of(cert: x509.Certificate) -> int:
    """The silo rank ``cert`` binds. Raises CertificateRefused if it binds none, an ambiguous one, or is the
    aggregator's."""
    role, rank = _identity_or_refuse(cert)
    if role != "silo":
        subject = cert.subject.rfc4514_string()
        raise CertificateRefused(f"certificate {subject} is the aggregator's; it binds no silo rank")
    return rank


# --- files --------------------------------------------------------------------------------------------------------


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """Checked for every output before any is written, so a refusal leaves no half-made identity behind."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (pass --force to replace)")


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Atomically (temp file, then rename), so a crash never leaves a truncated key or certificate. A secret is
    0600 from its first byte: the temporary file is created that way."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600 if secret else 0o644)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or first_line(exc)}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or first_line(exc)}") from None


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """The first certificate in the PEM file ``path``; ``what`` names the file in errors ("CA certificate")."""
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not a PEM certificate ({first_line(exc)})") from None


def load_request(path: Path) -> x509.CertificateSigningRequest:
    """A PEM certificate request whose signature holds (a damaged or altered request is refused)."""
    data = _read(path, "certificate request")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise ConfigError(f"certificate request {path} is not a PEM CSR ({first_line(exc)})") from None
    if not csr.is_signature_valid:
        raise ConfigError(f"certificate request {path} has an invalid signature (damaged or altered)")
    return csr


def load_pem(path: Path) -> x509.Certificate | x509.CertificateSigningRequest:
    """A certificate or a request, whichever the PEM file holds."""
    if b"-----BEGIN CERTIFICATE REQUEST-----" in _read(path, "file"):
        return load_request(path)
    return load_certificate(path)


def load_private_key(path: Path, what: str = "key") -> IssuerKey:
    """An unencrypted EC, RSA or Ed25519 private key from a PEM file (a CA's, or a member's own)."""
    data = _read(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{what} {path} is encrypted; fedsilo reads an unencrypted key (protect the file)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what} {path} is not a PEM private key ({first_line(exc)})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ConfigError(f"{what} {path} is a {type(key).__name__}; expected an EC, RSA or Ed25519 key")
    return key


def sign_bytes(key: IssuerKey, message: bytes) -> bytes:
    """``message`` signed with a member's key, whichever of the three kinds it is."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256())
    return key.sign(message)


def signed_by(cert: x509.Certificate, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` over ``message`` was made with the key ``cert`` certifies."""
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)
            key.verify(signature, message, pss, hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, IssuerKey]:
    """The CA and its key, checked to be a CA and to belong together: a mismatch would issue certificates that no
    member accepts."""
    cert = load_certificate(ca_cert, "CA certificate")
    key = load_private_key(ca_key, "CA key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(f"CA key {ca_key} does not belong to CA certificate {ca_cert}")
    if not _is_ca(cert):
        raise ConfigError(f"{ca_cert} is not a CA certificate (no BasicConstraints CA:TRUE)")
    return cert, key


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: CertificatePublicKeyTypes) -> str:
    """SHA-256 of the public key, for the site and the operator to compare by phone: the request the operator signs
    is then the one the site made, whatever carried it."""
    return hashlib.sha256(_spki(key)).hexdigest().upper()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(item: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return item.public_bytes(serialization.Encoding.PEM)


# --- issuing ------------------------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _check_days(days: int) -> dt.timedelta:
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    return dt.timedelta(days=days)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a member's key only signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _host_names(role: Role, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The aggregator's DNS names and IP addresses, which each silo checks against the host it dialled."""
    if role == "silo":
        if hosts:
            raise ConfigError("--host is for the aggregator's certificate; a silo is known by its rank")
        return []
    if not hosts:
        raise ConfigError("an aggregator certificate needs --host: each DNS name or IP address the silos dial")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host.lower()))
    return names


def _check_request_key(key: CertificatePublicKeyTypes, csr_path: Path) -> None:
    """Only keys that every TLS 1.3 peer accepts and that are strong enough today."""
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1", "secp521r1"):
        return
    if isinstance(key, ed25519.Ed25519PublicKey) or (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048):
        return
    raise ConfigError(
        f"certificate request {csr_path} has a {type(key).__name__} fedsilo does not sign "
        "(use EC P-256/384/521, Ed25519 or RSA of at least 2048 bits)"
    )


def _certificate(
    public_key: CertificatePublicKeyTypes,
    ca: x509.Certificate,
    ca_key: IssuerKey,
    role: Role,
    rank: int,
    site: str | None,
    hosts: Sequence[str],
    days: int,
    not_before: dt.datetime | None,
) -> x509.Certificate:
    """A member's certificate. It ends no later than the CA: a chain is invalid once its CA expires anyway, and the
    printed validity then shows the operator what they got."""
    start = not_before if not_before is not None else _now() - CLOCK_SKEW
    end = min(start + _check_days(days), ca.not_valid_after_utc)
    if end <= start:
        raise ConfigError(f"the CA certificate expired on {_when(ca.not_valid_after_utc)}; make a new CA")
    try:
        authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    names = [x509.UniformResourceIdentifier(_uri(role, rank)), *_host_names(role, hosts)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(role, rank, site))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([_USAGE[role]]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority, critical=False)
    )
    return builder.sign(ca_key, None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def init_ca(
    directory: Path, name: str = "fedsilo federation CA", days: int = CA_DAYS, *, force: bool = False
) -> tuple[Path, Path]:
    """A new federation CA: ``ca.pem`` (public; every member trusts it) and ``ca.key`` (0600; whoever holds it can
    make members, so it stays with the operator). path_length=0: it signs members, never another CA."""
    if not 1 <= len(name) <= 64:
        raise ConfigError(f"--name must be 1 to 64 characters, got {len(name)}")
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - CLOCK_SKEW
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _check_days(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, _pem(cert), secret=False)
    return cert_path, key_path


def request(
    directory: Path, role: Role = "silo", rank: int | None = None, site: str | None = None, *, force: bool = False
) -> tuple[Path, Path]:
    """Run at the site: the member's own key (0600; it never leaves) and a request (CSR) for the operator to sign.

    The request names the identity it asks for (``fedsilo://silo/R``) and the site; the operator decides what to
    sign. Returns (key, request) paths: ``silo-R.key``, ``silo-R.csr`` in ``directory``.
    """
    rank = _check_identity(role, rank)
    stem = file_stem(role, rank)
    key_path, csr_path = directory / f"{stem}.key", directory / f"{stem}.csr"
    subject = _subject(role, rank, site)
    _refuse_existing([key_path, csr_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(_uri(role, rank))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), secret=True)
    _write(csr_path, _pem(csr), secret=False)
    return key_path, csr_path


def sign(
    csr_path: Path,
    ca_cert: Path,
    ca_key: Path,
    out: Path | None = None,
    *,
    role: Role = "silo",
    rank: int | None = None,
    hosts: Sequence[str] = (),
    days: int = CERT_DAYS,
    not_before: dt.datetime | None = None,
    force: bool = False,
) -> Path:
    """The operator signs a member's request; returns the certificate's path (default: the request's, as ``.pem``).

    Only the request's public key, rank and site reach the certificate; its role, hosts and validity are the
    operator's. The request must ask for ``role``, and for ``rank`` when one is given, so a site cannot obtain another
    rank, or the aggregator's identity, unless the operator asked for exactly that.
    """
    expected_rank = None if role == "silo" and rank is None else _check_identity(role, rank)
    csr = load_request(csr_path)
    try:
        asked_role, asked_rank = _read_identity(csr)
    except ValueError as exc:
        raise ConfigError(f"certificate request {csr_path} {exc}") from None
    if asked_role != role:
        raise ConfigError(
            f"certificate request {csr_path} is for {_WHO[asked_role]}, not {_WHO[role]}; "
            f"pass --role {asked_role} if that is intended"
        )
    if expected_rank is not None and asked_rank != expected_rank:
        raise ConfigError(
            f"certificate request {csr_path} asks for rank {asked_rank}, but --rank {rank} was given; refusing to sign"
        )
    public_key = csr.public_key()
    _check_request_key(public_key, csr_path)
    out = out if out is not None else csr_path.with_suffix(".pem")
    _refuse_existing([out], force)
    ca, signer = _load_ca(ca_cert, ca_key)
    cert = _certificate(public_key, ca, signer, role, asked_rank, _site(csr.subject), hosts, days, not_before)
    _write(out, _pem(cert), secret=False)
    return out


def issue(
    directory: Path,
    ca_cert: Path,
    ca_key: Path,
    role: Role = "silo",
    rank: int | None = None,
    *,
    site: str | None = None,
    hosts: Sequence[str] = (),
    days: int = CERT_DAYS,
    not_before: dt.datetime | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Key and certificate made together by whoever holds the CA: for tests and single-operator clusters, where the
    key has no site to stay at. Across organisations use request + sign, so that no key travels. Returns (key,
    certificate) paths: ``silo-R.key``, ``silo-R.pem`` (or ``aggregator.*``) in ``directory``.
    """
    rank = _check_identity(role, rank)
    stem = file_stem(role, rank)
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    _refuse_existing([key_path, cert_path], force)
    ca, signer = _load_ca(ca_cert, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(key.public_key(), ca, signer, role, rank, site, hosts, days, not_before)
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, _pem(cert), secret=False)
    return key_path, cert_path


def describe(item: x509.Certificate | x509.CertificateSigningRequest) -> list[tuple[str, str]]:
    """(label, value) rows an IT team checks before trusting or signing: whose, which rank, which key, how long."""
    rows = [("subject", item.subject.rfc4514_string())]
    if isinstance(item, x509.Certificate) and _is_ca(item):
        rows.append(("role", "certificate authority"))
    else:
        try:
            role, rank = _read_identity(item)
            rows += [("role", role), ("rank", str(rank))] if role == "silo" else [("role", role)]
        except ValueError as exc:
            rows.append(("identity", f"none: {exc}"))
    san = _san(item)
    if san and (hosts := [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]):
        rows.append(("hosts", ", ".join(hosts)))
    if isinstance(item, x509.Certificate):
        rows += [
            ("serial", hex(item.serial_number)),
            ("valid", f"{_when(item.not_valid_before_utc)} to {_when(item.not_valid_after_utc)}"),
            ("issuer", item.issuer.rfc4514_string()),
        ]
    rows.append(("key sha256", fingerprint(item.public_key())))
    return rows


# --- checking peers -----------------------------------------------------------------------------------------------


def load_revoked(path: Path) -> frozenset[int]:
    """Revoked serials from ``path``: a CRL (PEM or DER), or text with one serial a line (decimal, or hex with 0x;
    ``#`` starts a comment). A CRL's signature is not checked: the file is the operator's own, and a revocation list
    can only shut members out, never let one in."""
    data = _read(path, "revocation list")
    if b"-----BEGIN" in data:
        try:
            return frozenset(entry.serial_number for entry in x509.load_pem_x509_crl(data))
        except ValueError as exc:
            raise ConfigError(f"revocation list {path} is PEM but not a CRL ({first_line(exc)})") from None
    with contextlib.suppress(ValueError):  # a text file is never valid DER
        return frozenset(entry.serial_number for entry in x509.load_der_x509_crl(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"revocation list {path} is neither a CRL nor a text list of serials") from None
    serials = set()
    for number, line in enumerate(text.splitlines(), 1):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        if not _SERIAL.fullmatch(token):
            raise ConfigError(
                f"revocation list {path} line {number}: {token!r} is not a serial (decimal, or hex with 0x)"
            )
        serials.add(int(token, 0) if token[:2].lower() == "0x" else int(token))
    return frozenset(serials)


def is_revoked(cert: x509.Certificate, revoked: AbstractSet[int]) -> bool:
    return cert.serial_number in revoked


def check_peer(
    cert: x509.Certificate,
    ca: x509.Certificate,
    revoked: AbstractSet[int] = frozenset(),
    *,
    role: Role = "silo",
    expected_rank: int | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Accept a peer's certificate or raise CertificateRefused with one line saying why; returns the rank it binds
    (0 for the aggregator).

    The transport calls this after OpenSSL accepted the handshake. OpenSSL has checked the chain, the dates and the
    key usage already; they are checked again here because it costs nothing and the refusal then says which. What
    OpenSSL cannot know is checked only here: the revoked serials, the fedsilo role and the rank the certificate binds
    (``expected_rank``: the rank the peer claims to join as).
    """
    subject = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateRefused(
            f"certificate {subject} was not issued by the federation CA ({ca.subject.rfc4514_string()})"
        ) from None
    now = now if now is not None else _now()
    if now < cert.not_valid_before_utc:
        raise CertificateRefused(f"certificate {subject} is not valid before {_when(cert.not_valid_before_utc)}")
    if now >= cert.not_valid_after_utc:
        raise CertificateRefused(f"certificate {subject} expired on {_when(cert.not_valid_after_utc)}")
    if is_revoked(cert, revoked):
        raise CertificateRefused(f"certificate serial {hex(cert.serial_number)} is revoked")
    peer_role, rank = _identity_or_refuse(cert)
    if peer_role != role:
        raise CertificateRefused(f"certificate {subject} is for {_WHO[peer_role]}, not {_WHO[role]}")
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if _USAGE[role] not in usages:
        raise CertificateRefused(f"certificate {subject} lacks the {_USAGE_NAME[role]} usage {_WHO[role]} needs")
    if expected_rank is not None and rank != expected_rank:
        raise CertificateRefused(f"certificate binds rank {rank}, not {expected_rank}")
    return rank


# --- TLS ----------------------------------------------------------------------------------------------------------


def _context(server: bool, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED  # a client's default; a server would otherwise not ask for a certificate
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"cannot load TLS certificate {cert} with key {key}: {first_line(exc)}") from None
    try:
        context.load_verify_locations(cafile=ca)
    except OSError as exc:
        raise ConfigError(f"cannot load TLS CA {ca}: {first_line(exc)}") from None
    return context


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The aggregator's side: TLS 1.3 only, and every silo must present a certificate from the federation CA with
    clientAuth usage (OpenSSL checks the chain and dates; :func:`check_peer` the rest)."""
    return _context(True, cert, key, ca)


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A silo's side: TLS 1.3 only, trusting the federation CA alone. Wrap with ``server_hostname=`` the host the silo
    dials: OpenSSL then checks it against the aggregator's DNS/IP names, and its serverAuth usage."""
    return _context(False, cert, key, ca)


def peer_certificate(connection: ssl.SSLSocket | ssl.SSLObject) -> x509.Certificate:
    """The certificate the other end presented in a finished handshake, for :func:`check_peer`."""
    der = connection.getpeercert(binary_form=True)
    if der is None:
        raise CertificateRefused("the peer presented no certificate")
    return x509.load_der_x509_certificate(der)
