"""Secure aggregation: the masks cancel in the sum and hide each update; real federations with it
end where plain ones do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from mlflow.tracking import MlflowClient

from fedsilo import certs, secagg
from fedsilo.averaging import Report
from fedsilo.errors import FederationError
from tests.procs import assert_one_line_error, final_weights, run

SILOS = (1, 2, 3)
COMMON = ["--batch-size", "16", "--lr", "0.3", "--local-epochs", "1", "--seed", "3"]


def agreed_secrets(token: str | None = "join-token") -> dict[int, dict[int, bytes]]:
    """Each silo's pair secrets, from the rows the group would gather (row 0: the aggregator's zeros)."""
    keys = {rank: secagg.new_key() for rank in SILOS}
    rows = torch.zeros(len(SILOS) + 1, secagg.ROW_WORDS, dtype=torch.float64)
    for rank, key in keys.items():
        public = secagg.public_bytes(key)
        rows[rank] = secagg.to_row(public, secagg.key_proof(token, rank, public))
    return {rank: secagg.pair_secrets(keys[rank], rank, rows, SILOS, token) for rank in SILOS}


def scaled_updates(numel: int) -> tuple[dict[int, torch.Tensor], list[Report]]:
    """n_k * Delta_k for each silo, as a silo forms it in fp32, and the reports it sends first."""
    generator = torch.Generator().manual_seed(0)
    updates, reports = {}, []
    for rank in SILOS:
        delta = torch.randn(numel, generator=generator) * 1e-3 * rank
        examples = 40 * rank
        updates[rank] = delta * examples
        reports.append(Report(rank, examples, 0.5, float(delta.norm())))
    return updates, reports


def reduce(sealed: list[torch.Tensor]) -> torch.Tensor:
    """What the reduce delivers: the int64 sum (wrapping, as gloo's sum does)."""
    total = torch.zeros_like(sealed[0])
    for part in sealed:
        total += part
    return total


def test_the_masked_sum_equals_the_plain_sum_and_one_masked_update_hides_its_values() -> None:
    # Prepare
    secrets = agreed_secrets()
    updates, reports = scaled_updates(200_000)
    accepted = list(SILOS)
    # Execute
    sealed = {r: secagg.Sealer(r, secrets[r]).seal(updates[r], reports, accepted, round_=3) for r in SILOS}
    summed = torch.zeros(200_000)
    secagg.unseal_(summed, reduce(list(sealed.values())), reports, accepted)
    # Assert: the sum within fp32's resolution; a lone masked update is noise
    plain = sum(u.double() for u in updates.values())
    assert float((summed.double() - plain).norm() / plain.norm()) < 1e-6
    for rank in SILOS:
        correlation = torch.corrcoef(torch.stack([sealed[rank].double(), updates[rank].double()]))[0, 1]
        assert abs(float(correlation)) < 0.01
    # the masks alone: zero updates seal to non-zero values that sum to exactly zero
    zeros = [secagg.Sealer(r, secrets[r]).seal(torch.zeros(1000), reports, accepted, round_=3) for r in SILOS]
    assert all(bool(z.ne(0).any()) for z in zeros)
    assert bool(reduce(zeros).eq(0).all())


def test_each_round_has_its_own_masks_and_a_rejected_silo_is_left_out() -> None:
    secrets = agreed_secrets()
    updates, reports = scaled_updates(10_000)
    # two rounds' masks differ (a repeated keystream would let the aggregator difference them away)
    one, two = (secagg.Sealer(1, secrets[1]).seal(torch.zeros(10_000), reports, list(SILOS), round_=r) for r in (1, 2))
    assert not torch.equal(one, two)
    # silo 3 rejected: it sends zeros, unmasked, and the others mask only between themselves
    accepted = [1, 2]
    sealed = [secagg.Sealer(r, secrets[r]).seal(updates[r], reports, accepted, round_=1) for r in accepted]
    sealed.append(secagg.Sealer(3, secrets[3]).seal(torch.zeros(10_000), reports, accepted, round_=1))
    summed = torch.zeros(10_000)
    secagg.unseal_(summed, reduce(sealed), reports, accepted)
    plain = updates[1].double() + updates[2].double()
    assert float((summed.double() - plain).norm() / plain.norm()) < 1e-6


def test_the_worst_case_update_does_not_overflow_the_ring() -> None:
    # every silo's whole norm in one element, all of the same sign, many examples: the largest sum
    # the reports allow, which the 64-bit ring must hold exactly
    secrets = agreed_secrets()
    reports = [Report(rank, 10**6, 0.5, 1e3) for rank in SILOS]
    updates = {rank: torch.tensor([1e3 * 10**6, 0.0, -1.0]) for rank in SILOS}
    sealed = [secagg.Sealer(r, secrets[r]).seal(updates[r], reports, list(SILOS), round_=1) for r in SILOS]
    summed = torch.zeros(3)
    secagg.unseal_(summed, reduce(sealed), reports, list(SILOS))
    assert torch.allclose(summed, torch.tensor([3e9, 0.0, -3.0]), rtol=1e-6)


def test_a_key_not_proven_by_the_join_token_stops_the_federation() -> None:
    keys = {rank: secagg.new_key() for rank in SILOS}
    rows = torch.zeros(4, secagg.ROW_WORDS, dtype=torch.float64)
    for rank, key in keys.items():
        public = secagg.public_bytes(key)
        rows[rank] = secagg.to_row(public, secagg.key_proof("join-token", rank, public))
    stranger = secagg.public_bytes(secagg.new_key())  # substituted on the way, its proof kept
    rows[2, : secagg.KEY_BYTES // 4] = secagg.to_row(stranger, bytes(32))[: secagg.KEY_BYTES // 4]
    with pytest.raises(FederationError, match="silo 2's secure-aggregation key is not proven by the join token"):
        secagg.pair_secrets(keys[1], 1, rows, SILOS, "join-token")


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, secagg.Identity]:
    """Each silo's TLS identity from one federation CA, and silo 2's from another CA ("stranger")."""
    made: dict[Any, secagg.Identity] = {}
    for name, ranks in (("ours", SILOS), ("theirs", (2,))):
        directory = tmp_path_factory.mktemp(name)
        ca = certs.init_ca(directory)
        for rank in ranks:
            key, cert = certs.issue(directory, *ca, "silo", rank)
            identity = secagg.Identity(
                certs.load_certificate(cert), certs.load_private_key(key), certs.load_certificate(ca[0]), frozenset()
            )
            made[rank if name == "ours" else "stranger"] = identity
    return made


def signed_rows(identities: dict[Any, secagg.Identity], token: str | None = "join-token") -> tuple[dict, torch.Tensor]:
    keys = {rank: secagg.new_key() for rank in SILOS}
    rows = torch.zeros(4, secagg.ROW_WORDS, dtype=torch.float64)
    for rank, key in keys.items():
        public = secagg.public_bytes(key)
        rows[rank] = signed_row(identities[rank], rank, public, token)
    return keys, rows


def signed_row(identity: secagg.Identity, rank: int, public: bytes, token: str | None = "join-token") -> torch.Tensor:
    signature = certs.sign_bytes(identity.key, secagg.signed_message(rank, public))
    der = identity.certificate.public_bytes(serialization.Encoding.DER)
    return secagg.to_row(public, secagg.key_proof(token, rank, public), signature, der)


def test_keys_signed_by_the_silos_certificates_agree(identities) -> None:
    keys, rows = signed_rows(identities)
    secrets = {r: secagg.pair_secrets(keys[r], r, rows, SILOS, "join-token", identities[r]) for r in SILOS}
    assert secrets[1][2] == secrets[2][1] and secrets[1][3] == secrets[3][1] and secrets[1][2] != secrets[1][3]


def test_the_relay_cannot_put_its_own_key_in_a_silos_place_under_tls(identities) -> None:
    # The aggregator holds the join token, so it can prove a key of its own; it cannot sign it as silo 2
    keys, rows = signed_rows(identities)
    theirs = secagg.public_bytes(secagg.new_key())
    _, _, signature, der = secagg.from_row(rows[2])
    rows[2] = secagg.to_row(theirs, secagg.key_proof("join-token", 2, theirs), signature, der)
    secagg.pair_secrets(keys[1], 1, rows, SILOS, "join-token")  # the token alone cannot tell
    with pytest.raises(FederationError, match="silo 2's secure-aggregation key is not signed by its certificate's key"):
        secagg.pair_secrets(keys[1], 1, rows, SILOS, "join-token", identities[1])


@pytest.mark.parametrize(
    "who, expected",
    [
        (3, "certificate binds rank 3, not 2"),  # a member signing as another rank
        ("stranger", "was not issued by the federation CA"),
        (None, "came without a certificate"),
    ],
)
def test_a_key_with_a_wrong_certificate_stops_the_federation(identities, who, expected) -> None:
    keys, rows = signed_rows(identities)
    public = secagg.public_bytes(secagg.new_key())
    if who is None:
        rows[2] = secagg.to_row(public, secagg.key_proof("join-token", 2, public))
    else:
        rows[2] = signed_row(identities[who], 2, public)
    with pytest.raises(FederationError, match=expected):
        secagg.pair_secrets(keys[1], 1, rows, SILOS, "join-token", identities[1])


@pytest.mark.slow  # two 3-silo federations each; the masks' algebra is checked in the default run above
@pytest.mark.parametrize("transport", ["collective", "tls"])
def test_a_federation_with_secure_aggregation_ends_with_the_plain_model(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, transport: str
) -> None:
    # Prepare
    shared = ["--silos", "3", "--rounds", "2", "--model", str(tiny_bert), "--dataset", str(sentiment_csv)]
    shared += [*COMMON, "--transport", transport, "--checkpoint-dir", "ckpt"]
    # Execute: the same federation with and without masks
    finals, wire_bytes, outputs = {}, {}, {}
    for name, extra in (("plain", []), ("masked", ["--secure-aggregation"])):
        (tmp_path / name).mkdir()
        result = run("run", *shared, *extra, cwd=tmp_path / name)
        assert result.returncode == 0, result.stdout + result.stderr
        finals[name], outputs[name] = final_weights(tmp_path / name / "ckpt"), result.stdout
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name}/mlflow.db")
        (only,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
        wire_bytes[name] = float(only.data.params["megabytes_per_silo_round"])
    # Assert: the same model, within the fixed point's (and fp32's) resolution; the updates did travel
    # masked, as int64 (8 bytes an element against fp32's 4, beside the 4 of the model sent back)
    plain, masked = finals["plain"], finals["masked"]
    assert float((masked - plain).norm() / plain.norm()) < 1e-6
    assert wire_bytes["masked"] == pytest.approx(wire_bytes["plain"] * 12 / 8, rel=1e-3)
    assert "updates arrive masked" in outputs["masked"] and "masked" not in outputs["plain"]


def test_secure_aggregation_with_one_silo_is_one_line(tmp_path: Path) -> None:
    result = run("aggregator", "--silos", "1", "--secure-aggregation", cwd=tmp_path)
    assert result.returncode != 0
    assert_one_line_error(result.stderr, "needs at least 2 silos")


def test_masks_drawn_while_training_are_the_masks_of_the_silos_accepted_at_the_seal() -> None:
    # Prepare: silo 1 draws round 1's masks ahead (against 2 and 3, as every silo does while it
    # trains), then the update check rejects silo 3; round 2 is drawn after a draw left untaken
    secrets = agreed_secrets()
    sealer = secagg.Sealer(1, secrets[1])
    sealer.draw(1, 10_000)
    expected = torch.zeros(10_000, dtype=torch.int64)
    secagg.mask_(expected, 1, secrets[1], [2], round_=1)  # the definition: against the accepted only
    # Execute
    got = sealer.masks(1, 10_000, accepted=[1, 2])
    sealer.draw(2, 10_000)  # silo 1 rejected in round 2: nothing takes these
    sealer.draw(3, 10_000)
    third = sealer.masks(3, 10_000, accepted=[1, 2, 3])
    # Assert
    assert torch.equal(got, expected)
    everyone = torch.zeros(10_000, dtype=torch.int64)
    secagg.mask_(everyone, 1, secrets[1], [2, 3], round_=3)
    assert torch.equal(third, everyone)
