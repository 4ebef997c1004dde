"""The comparison helpers every precision test relies on (fused_resnet.testing)."""

import torch

from fused_resnet.testing import (errors_beyond_eager, errors_beyond_eager_in_most_draws,
                                  errors_beyond_eager_redrawing,
                                  relative_differences_beyond)


def _draw(fused_error: float, eager_error: float = 1e-3) -> tuple[dict, dict, dict]:
    truth = {"grad": torch.ones(16, dtype=torch.float64),
             "steps": torch.tensor(3)}
    eager = {"grad": (truth["grad"] + eager_error).float(), "steps": torch.tensor(3)}
    fused = {"grad": (truth["grad"] + fused_error).float(), "steps": torch.tensor(3)}
    return fused, eager, truth


def test_errors_beyond_eager_names_the_tensor_and_its_figures():
    assert errors_beyond_eager(*_draw(1.9e-3)) == []
    [failure] = errors_beyond_eager(*_draw(2.5e-3))
    assert failure.startswith("grad: fused RMS error 2.500e-03 > 2.0 x eager's 1.000e-03")


def test_integer_tensors_must_be_equal():
    fused, eager, truth = _draw(0.0)
    fused["steps"] = torch.tensor(4)
    assert errors_beyond_eager(fused, eager, truth) == ["steps: 4 != 3"]


def test_most_draws_fails_a_tensor_beyond_in_a_majority_only():
    good, bad = _draw(1e-3), _draw(1e-2)
    assert errors_beyond_eager_in_most_draws([good, bad, good]) == []
    failures = errors_beyond_eager_in_most_draws([bad, good, bad])
    assert len(failures) == 2 and all(f.startswith("grad: ") for f in failures)
    assert errors_beyond_eager_in_most_draws([good, bad]) == []
    assert len(errors_beyond_eager_in_most_draws([bad, bad])) == 2


def test_redrawing_draws_again_only_after_a_failure_and_judges_the_majority():
    good, bad = _draw(1e-3), _draw(1e-2)

    def drawing(sequence):
        drawn = []

        def draw(index):
            drawn.append(index)
            return sequence[index]
        return draw, drawn

    draw, drawn = drawing([good, bad, bad])
    assert errors_beyond_eager_redrawing(draw) == [] and drawn == [0]
    draw, drawn = drawing([bad, good, good])
    assert errors_beyond_eager_redrawing(draw) == [] and drawn == [0, 1, 2]
    draw, drawn = drawing([bad, good, bad])
    assert len(errors_beyond_eager_redrawing(draw)) == 2 and drawn == [0, 1, 2]


def test_a_nan_result_fails_both_comparisons():
    # An element a kernel never wrote stays NaN in the poisoned buffers: it must fail.
    truth = {"a": torch.ones(4, dtype=torch.float64)}
    fused = {"a": torch.tensor([1.0, float("nan"), 1.0, 1.0])}
    assert errors_beyond_eager(fused, {"a": torch.ones(4)}, truth) != []
    assert relative_differences_beyond(fused, truth, 1e-9) != []
