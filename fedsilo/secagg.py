"""Secure aggregation by pairwise masks (Bonawitz et al., CCS 2017, without the dropout recovery):
the aggregator learns sum_k n_k Delta_k and nothing about any one silo's update.

Each pair of silos (i, j) agrees a secret by X25519 once per federation start (a restart re-keys).
Every round each silo encodes its scaled update as 64-bit fixed point and adds, for every other
accepted silo j, the keystream PRG(s_ij, round) when i < j and subtracts it when i > j. Arithmetic
wraps modulo 2^64 (two's complement int64, in torch and in gloo's sum alike), so in the reduce every
mask meets its negation and the sum is exactly the sum of the encoded updates.

Overflow. The encoded sum must stay inside int64: |sum_k n_k Delta_k[i] * 2^f| < 2^63 for every
element i. Each silo reports its update norm ||Delta_k||_2, which bounds every element, in clear
before the reduce, so every rank computes the same bound B = sum_k n_k ||Delta_k||_2 and the same
number of fractional bits f = 61 - ceil(log2 B): the sum is then below 2^61, a factor 4 under the
limit (the rounding of --transfer-dtype bfloat16 and of the encoding add far less than that). The
resolution, 2^-f, is B * 2^-61: relative to the sum's own size about 1e-18, far below fp32's 1e-7.
(fedbiomed's 32-bit ring overflowed with K updates; 64 bits with a per-round scale cannot.)

Who sent a key. The aggregator relays the public keys, so it could hand silo i its own key in place
of silo j's and unmask i's update. Under ``--transport tls`` each silo signs its key with the private
key of its certificate and sends the certificate along; every silo checks that certificate against
the federation CA (issuer, dates, revocation list, the rank it binds) and the signature against it,
so a substituted key stops the federation. Under ``collective`` the keys carry an HMAC under the
join token, which tells members from outsiders but not from the aggregator, which holds the token.

Masks are an AES-256-CTR keystream (OpenSSL, through ``cryptography``): uniform over the ring, so a
masked update by itself is uniform noise to anyone without the pair secrets.

Functions on CPU tensors, and a silo's :class:`Sealer`, which draws a round's masks while it trains;
the round loops call them around the transport's ``reduce_sum_``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedsilo import certs
from fedsilo.averaging import Report
from fedsilo.comm import Transport
from fedsilo.config import Settings
from fedsilo.errors import CertificateRefused, FederationError

KEY_BYTES = 32
SUM_BITS = 61  # the encoded sum stays below 2^61: two bits of headroom under int64's 2^63
# A silo's row: its public key, the key's HMAC proof, then (under --transport tls) a signature
# and the certificate to check it with, each after its length: room for an RSA-4096 signature
# and a 4 KiB DER certificate, as 32-bit words in a float64 row.
MAX_SIGNATURE, MAX_CERTIFICATE = 512, 4096
ROW_BYTES = 2 * KEY_BYTES + 4 + MAX_SIGNATURE + 4 + MAX_CERTIFICATE
ROW_WORDS = ROW_BYTES // 4


@dataclass(frozen=True)
class Identity:
    """A silo's TLS identity, which signs its key under --transport tls, and what it checks the
    others' against: the federation CA and the revoked serials."""

    certificate: x509.Certificate
    key: certs.IssuerKey
    ca: x509.Certificate
    revoked: frozenset[int]


def identity_of(settings: Settings) -> Identity | None:
    """The silo's identity from its TLS files under --transport tls; None under collective."""
    fed = settings.federation
    if fed.transport != "tls":
        return None
    assert fed.tls_cert is not None and fed.tls_key is not None and fed.tls_ca is not None  # checked at start
    return Identity(
        certs.load_certificate(fed.tls_cert),
        certs.load_private_key(fed.tls_key, "TLS key"),
        certs.load_certificate(fed.tls_ca, "CA certificate"),
        certs.load_revoked(fed.tls_revoked) if fed.tls_revoked is not None else frozenset(),
    )


def signed_message(rank: int, public: bytes) -> bytes:
    return b"fedsilo-secagg-key:%d:" % rank + public


def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_proof(token: str | None, rank: int, public: bytes) -> bytes:
    """Binds silo ``rank``'s public key under the join token, so another silo can tell that the key
    came from a member and not from whoever relayed it. Without a token: 32 zero bytes."""
    if not token:
        return bytes(KEY_BYTES)
    return hmac.new(token.encode(), b"secagg-key:%d:" % rank + public, hashlib.sha256).digest()


def to_row(public: bytes, proof: bytes, signature: bytes = b"", certificate: bytes = b"") -> torch.Tensor:
    """A silo's row (ROW_BYTES) as float64 values, each an exact 32-bit word: the rows ``gather_rows`` moves."""
    if len(signature) > MAX_SIGNATURE or len(certificate) > MAX_CERTIFICATE:
        raise FederationError(f"secure aggregation: a certificate over {MAX_CERTIFICATE} bytes (DER) does not fit")
    raw = public + proof
    for part, room in ((signature, MAX_SIGNATURE), (certificate, MAX_CERTIFICATE)):
        raw += len(part).to_bytes(4, "little") + part + bytes(room - len(part))
    words = torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
    return words.to(torch.float64)


def from_row(row: torch.Tensor) -> tuple[bytes, bytes, bytes, bytes]:
    """(public key, proof, signature, certificate) from a silo's row; the last two empty where absent."""
    words = row.to(torch.int64).to(torch.int32)  # exact: each value is a 32-bit word
    raw = words.numpy().tobytes()
    public, proof, at = raw[:KEY_BYTES], raw[KEY_BYTES : 2 * KEY_BYTES], 2 * KEY_BYTES
    parts = []
    for room in (MAX_SIGNATURE, MAX_CERTIFICATE):
        length = min(int.from_bytes(raw[at : at + 4], "little"), room)
        parts.append(raw[at + 4 : at + 4 + length])
        at += 4 + room
    return public, proof, parts[0], parts[1]


def _check_signed(other: int, public: bytes, signature: bytes, certificate: bytes, identity: Identity) -> None:
    """Silo ``other``'s key must come signed by the key of a certificate the federation CA gave rank
    ``other``: else the relay (the aggregator) may have put its own key in its place."""
    who = f"silo {other}'s secure-aggregation key"
    try:
        cert = x509.load_der_x509_certificate(certificate)
    except ValueError:
        raise FederationError(f"{who} came without a certificate (--transport tls signs every key)") from None
    try:
        certs.check_peer(cert, identity.ca, identity.revoked, role="silo", expected_rank=other)
    except CertificateRefused as exc:
        raise FederationError(f"{who} came with a certificate that is refused: {exc}") from None
    if not certs.signed_by(cert, signature, signed_message(other, public)):
        raise FederationError(f"{who} is not signed by its certificate's key: it was replaced on the way")


def pair_secrets(
    mine: X25519PrivateKey,
    rank: int,
    rows: torch.Tensor,
    silos: Iterable[int],
    token: str | None,
    identity: Identity | None = None,
) -> dict[int, bytes]:
    """This silo's secret with every other silo, from the gathered rows (row r: silo r's key and proof).
    A key whose proof does not verify under the token, or (with ``identity``, under --transport tls)
    whose signature and certificate do not, stops the federation."""
    secrets = {}
    for other in silos:
        if other == rank:
            continue
        public, proof, signature, certificate = from_row(rows[other, :ROW_WORDS])
        if not hmac.compare_digest(proof, key_proof(token, other, public)):
            raise FederationError(f"silo {other}'s secure-aggregation key is not proven by the join token")
        if identity is not None:
            _check_signed(other, public, signature, certificate, identity)
        shared = mine.exchange(X25519PublicKey.from_public_bytes(public))
        low, high = sorted((rank, other))
        secrets[other] = HKDF(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"fedsilo-secagg:%d:%d" % (low, high)
        ).derive(shared)
    return secrets


def keystream(secret: bytes, round_: int, numel: int) -> torch.Tensor:
    """``numel`` uniform int64 values from AES-256-CTR under ``secret``, a fresh stream each round."""
    # The 16-byte counter block: the round in the high 8 bytes, the block count in the low 8, so two
    # rounds' streams never overlap (2^64 blocks each). AES-CTR, not ChaCha20: AES-NI makes it ~1.6x
    # faster here, and the masks are most of secure aggregation's cost.
    counter = round_.to_bytes(8, "big") + bytes(8)
    encryptor = Cipher(algorithms.AES(secret), modes.CTR(counter)).encryptor()
    stream = bytearray(numel * 8 + 15)  # update_into wants room for a block beyond the input
    encryptor.update_into(bytes(numel * 8), stream)
    return torch.frombuffer(stream, dtype=torch.int64, count=numel)


def fraction_bits(reports: Iterable[Report], accepted: Iterable[int]) -> int:
    """f for this round, from the accepted silos' reports (examples n_k, update norm ||Delta_k||_2),
    which every rank holds alike."""
    taken = set(accepted)
    bound = sum(r.examples * r.update_norm for r in reports if r.rank in taken)
    if not math.isfinite(bound):
        raise FederationError("secure aggregation: an accepted update is not finite")
    if bound <= 0:
        return SUM_BITS  # every update is zero
    return SUM_BITS - math.ceil(math.log2(bound))


def encode(update: torch.Tensor, bits: int, scaled: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fixed point: round(update * 2^bits) as int64, into ``out`` (``scaled``: fp32 scratch of the same
    size). In fp32, with no loss: scaling by a power of two is exact, and rounding gives the same
    integer as in fp64 (above 2^23 an fp32 is already whole)."""
    torch.mul(update, 2.0**bits, out=scaled).round_()
    return out.copy_(scaled)


def mask_(
    encoded: torch.Tensor, rank: int, secrets: Mapping[int, bytes], others: Iterable[int], round_: int, sign: int = 1
) -> None:
    """Add this silo's masks against ``others`` in place: +PRG(s_ij) for each j above it, -PRG for each
    below (``sign`` -1: take them out again)."""
    for other in others:
        if other == rank:
            continue
        stream = keystream(secrets[other], round_, encoded.numel()).to(encoded.device)
        if (rank < other) == (sign > 0):
            encoded.add_(stream)
        else:
            encoded.sub_(stream)


class Sealer:
    """A silo's side of secure aggregation from round to round.

    The masks do not depend on the update, so :meth:`draw` starts summing the round's keystreams
    against every other silo in a background thread (OpenSSL's AES releases the GIL) as local training
    starts; :meth:`seal` waits for them, takes out the stream of any silo the update check rejected
    (rarely any), and adds them to the encoded update. Off the round's critical path whenever training
    takes longer than K - 1 keystreams. The encoding goes into buffers kept from round to round: a fresh
    tensor of the model's size each round costs more in page faults than the arithmetic in it."""

    def __init__(self, rank: int, secrets: Mapping[int, bytes]) -> None:
        self.rank, self.secrets = rank, secrets
        # the round and size being drawn, the thread, and the box it leaves its sum (or error) in
        self.drawing: tuple[int, int, threading.Thread, list[torch.Tensor | BaseException]] | None = None
        self.scaled = torch.empty(0)
        self.wire = torch.empty(0, dtype=torch.int64)

    def draw(self, round_: int, numel: int) -> None:
        """Start summing round ``round_``'s masks against every other silo."""
        box: list[torch.Tensor | BaseException] = []
        thread = threading.Thread(target=self._sum, args=(round_, numel, box), name="secagg-masks", daemon=True)
        self.drawing = (round_, numel, thread, box)
        thread.start()

    def _sum(self, round_: int, numel: int, box: list[torch.Tensor | BaseException]) -> None:
        try:
            total = torch.zeros(numel, dtype=torch.int64)
            mask_(total, self.rank, self.secrets, self.secrets, round_)
            box.append(total)
        except BaseException as error:  # re-raised where the masks are taken
            box.append(error)

    def masks(self, round_: int, numel: int, accepted: Iterable[int]) -> torch.Tensor:
        """This round's masks against the accepted silos (drawn now if :meth:`draw` was not called)."""
        if self.drawing is None or self.drawing[:2] != (round_, numel):
            self.draw(round_, numel)
        assert self.drawing is not None
        _, _, thread, box = self.drawing
        self.drawing = None
        thread.join()
        if isinstance(box[0], BaseException):
            raise box[0]
        total = box[0]
        taken = set(accepted)
        mask_(total, self.rank, self.secrets, [o for o in self.secrets if o not in taken], round_, sign=-1)
        return total

    def seal(self, update: torch.Tensor, reports: list[Report], accepted: list[int], round_: int) -> torch.Tensor:
        """What this silo puts into the reduce: its (scaled) update in fixed point plus its masks; a
        rejected silo's zeros go unmasked, as no accepted silo masks against it. The result is a
        buffer this sealer reuses next round."""
        if self.wire.numel() != update.numel() or self.wire.device != update.device:
            self.scaled = torch.empty(update.numel(), device=update.device)
            self.wire = torch.empty(update.numel(), dtype=torch.int64, device=update.device)
        encode(update, fraction_bits(reports, accepted), self.scaled, self.wire)
        if self.rank in accepted:
            self.wire.add_(self.masks(round_, update.numel(), accepted).to(self.wire.device))
        return self.wire


def exchange(group: Transport, rank: int, token: str | None, identity: Identity | None = None) -> dict[int, bytes]:
    """A silo's pair secrets, agreed over the group as it forms (every rank gathers every public
    key; the aggregator's row is zeros): a new key pair each start, so a restart re-keys. With
    ``identity`` the key goes signed, with the certificate to check it by."""
    key = new_key()
    public = public_bytes(key)
    signature = certificate = b""
    if identity is not None:
        signature = certs.sign_bytes(identity.key, signed_message(rank, public))
        certificate = identity.certificate.public_bytes(Encoding.DER)
    rows = group.gather_rows(to_row(public, key_proof(token, rank, public), signature, certificate))
    return pair_secrets(key, rank, rows, range(1, group.world_size), token, identity)


def relay(group: Transport) -> None:
    """The aggregator's side of :func:`exchange`: it learns the public keys, which give it nothing."""
    group.gather_rows(torch.zeros(ROW_WORDS, dtype=torch.float64))


def unseal_(summed: torch.Tensor, masked: torch.Tensor, reports: list[Report], accepted: list[int]) -> None:
    """The aggregator's sum of the updates from the reduce's masked sum, into ``summed``; ``masked``
    is zeroed for the next round."""
    summed.copy_(masked).mul_(2.0 ** -fraction_bits(reports, accepted))
    masked.zero_()
