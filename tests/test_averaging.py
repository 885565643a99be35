import math

import pytest
import torch

from fedsilo import averaging
from fedsilo.averaging import Report, Rows, UpdateRejected, finish_average, take_update, validate_updates
from fedsilo.train import EvalResult
from tests.reference import weighted_average


def test_weighted_average_weights_by_examples() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([4.0, 3.0])
    # 1 example vs 2 examples: (1*a + 2*b) / 3
    assert torch.allclose(weighted_average([a, b], [1, 2]), torch.tensor([3.0, 2.0]))


def test_running_sum_of_deltas_equals_weighted_average() -> None:
    torch.manual_seed(0)
    reference = torch.randn(1000)
    locals_ = [reference + 0.01 * torch.randn(1000) for _ in range(3)]
    counts = [17, 250, 3]
    running = torch.zeros(1000)
    for local, n in zip(locals_, counts, strict=False):
        buffer = local.clone()
        norm = take_update(running, buffer, reference, n)
        assert torch.equal(buffer, reference)  # left holding the reference again
        assert math.isclose(norm, float((local - reference).norm()), rel_tol=1e-5)
    result = finish_average(reference.clone(), running, sum(counts))
    expected = weighted_average(locals_, counts)
    assert torch.allclose(result, expected, rtol=1e-6, atol=1e-7)


def test_take_update_visits_only_the_listed_rows_of_a_table() -> None:
    # Prepare: a flat vector of [4 dense | 6 x 3 table | 5 dense]; training changed the dense
    # values and rows 1 and 4 of the table. Row 2 differs too, but is not listed: the contract
    # says it cannot have changed, so take_update must not read it (a dense pass would).
    torch.manual_seed(0)
    reference = torch.randn(27)
    local = reference.clone()
    local[:4] += torch.randn(4)
    local[22:] += torch.randn(5)
    table = local[4:22].view(6, 3)
    table[1] += 1.0
    table[4] -= 2.0
    expected_update = local - reference
    table[2] += 100.0  # not listed
    summed = torch.ones(27)
    # Execute
    norm = take_update(summed, local, reference, 3, [Rows(4, (6, 3), torch.tensor([1, 4]))])
    # Assert: the sum and the norm of the changed values; the listed rows and the rest restored
    assert torch.allclose(summed, 1.0 + 3 * expected_update, rtol=1e-6, atol=1e-6)
    assert math.isclose(norm, float(expected_update.norm()), rel_tol=1e-6)
    restored = torch.ones(27, dtype=torch.bool)
    restored[4 + 2 * 3 : 4 + 3 * 3] = False
    assert torch.equal(local[restored], reference[restored])
    assert torch.equal(local[10:13], reference[10:13] + 100.0)  # the unlisted row, untouched


@pytest.mark.parametrize(
    "models, counts, message",
    [
        ([], [], "one example count"),
        ([torch.zeros(2)], [1, 2], "one example count"),
        ([torch.zeros(2), torch.zeros(3)], [1, 1], "differ in shape"),
        ([torch.zeros(2)], [0], "positive"),
    ],
)
def test_weighted_average_rejects_inconsistent_input(models, counts, message) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_average(models, counts)


def test_finish_average_widens_a_narrow_sum_slice_by_slice(monkeypatch) -> None:
    # Prepare: a bf16 sum longer than several slices (made small for the test)
    monkeypatch.setattr(averaging, "WIDEN_SLICE", 64)
    torch.manual_seed(0)
    reference, summed = torch.randn(1000), torch.randn(1000).to(torch.bfloat16)
    expected = reference + summed.float() / 7
    # Execute
    result = finish_average(reference, summed, 7)
    # Assert: in place, every slice included, as the one-shot widening would give
    assert result is reference and torch.allclose(result, expected, rtol=1e-6, atol=1e-7)


def test_finish_average_needs_examples() -> None:
    with pytest.raises(ValueError):
        finish_average(torch.zeros(2), torch.zeros(2), 0)


def reports(*norms: float, loss: float = 0.5) -> list[Report]:
    return [Report(rank, 10, loss, norm) for rank, norm in enumerate(norms, start=1)]


def test_reports_are_read_from_the_gathered_rows_by_rank_without_the_aggregators() -> None:
    # The aggregator and every silo read the same all-gathered rows: rank 0's row is a placeholder.
    rows = torch.tensor(
        [[0.0] * 6, [30.0, 0.7, 1.5, 2.0, 8.0, 0.0], [270.0, 0.4, float("nan"), 3.0, 68.0, 1.0]],
        dtype=torch.float64,
    )
    assert rows.shape[1] == Report.placeholder().numel()
    (one, two) = Report.from_rows(rows)
    assert one == Report(1, 30, 0.7, 1.5, 2.0, 8)
    assert (two.rank, two.examples, two.train_loss, two.steps, two.sits_out) == (2, 270, 0.4, 68, 1)
    assert math.isnan(two.update_norm)
    assert isinstance(one.examples, int) and isinstance(one.steps, int)


def test_a_report_survives_its_row_and_the_placeholder_is_the_same_shape() -> None:
    report = Report(3, 2**40 + 1, 0.25, 7.5)  # a count beyond float32 still comes back exact
    rows = torch.stack(
        [Report.placeholder(), Report(1, 1, 0.0, 0.0).to_row(), Report(2, 1, 0.0, 0.0).to_row(), report.to_row()]
    )
    assert Report.from_rows(rows)[-1] == report and Report.placeholder().shape == report.to_row().shape


def test_evaluation_rows_add_up_over_silos_without_the_aggregators() -> None:
    rows = torch.stack(
        [
            EvalResult.placeholder() + 99,  # rank 0's row is never counted
            EvalResult(40, 12.0, 30).to_row(),
            EvalResult(60, 30.0, 36).to_row(),
        ]
    )
    total = EvalResult.from_rows(rows)
    assert total == EvalResult(100, 42.0, 66) and isinstance(total.correct, int)
    assert total.accuracy == 0.66 and total.loss == 0.42


def test_validation_accepts_ordinary_updates() -> None:
    assert validate_updates(reports(1.0, 1.2, 0.9), 3, 10.0, "fail") == ([1, 2, 3], [])


def test_non_finite_update_fails_naming_silo_and_round() -> None:
    with pytest.raises(UpdateRejected, match="silo 2 sent a non-finite update in round 4"):
        validate_updates(reports(1.0, math.nan, 1.0), 4, 10.0, "fail")


def test_outlier_norm_is_skipped_with_skip_policy() -> None:
    accepted, reasons = validate_updates(reports(1.0, 1.1, 50.0, 0.9), 2, 10.0, "skip")
    assert accepted == [1, 2, 4]
    assert len(reasons) == 1 and "silo 3" in reasons[0] and "round 2" in reasons[0]


def test_all_rejected_is_an_error_even_when_skipping() -> None:
    with pytest.raises(UpdateRejected, match="every update"):
        validate_updates(reports(math.inf, math.nan), 1, 10.0, "skip")


def test_a_silo_sitting_out_is_neither_accepted_nor_rejected_even_when_failing_on_rejects() -> None:
    # its budget spent (--dp-on-exhausted skip), it trained on nothing: under "fail" that is no failure
    sitting = [*reports(1.0, 1.2), Report(3, 10, 0.0, 0.0, sits_out=1)]
    assert validate_updates(sitting, 5, 10.0, "fail") == ([1, 2], [])
    with pytest.raises(UpdateRejected, match="silo 3 trained on no examples"):
        validate_updates([*reports(1.0, 1.2), Report(3, 0, 0.0, 0.0)], 5, 10.0, "fail")
