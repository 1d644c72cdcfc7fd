"""Power iteration and Hutchinson against exact eigenvalues and traces of known Hessians.

Tolerances: the top eigenvalue to 1e-3 relative (power iteration's own stop is a 1e-3 relative residual);
traces within 3 standard errors of the exact trace (the estimate is a sample mean).
"""

from __future__ import annotations

import pytest
import torch

from qbert.hessian import PowerIterationWarning, hutchinson_traces, top_eigenvalues
from tests.hessian._quadratic import Quadratic, least_squares, quadratic_loss, spd_matrix

EIG_REL_TOL = 1e-3
STDERRS = 3
SHAPE_A, SHAPE_B = (3, 4), (2, 5)  # 12 + 10 weights
NO_DATA = [{}]  # the quadratic's loss reads no batch


def _exact_top(h: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(h.double())[-1].item()


@pytest.fixture(scope="module")
def quadratic():
    return Quadratic(spd_matrix(12 + 10), SHAPE_A, SHAPE_B)


def _blocks(model: Quadratic) -> dict[str, torch.Tensor]:
    s = model.split
    return {"a": model.matrix[:s, :s], "b": model.matrix[s:, s:]}


def test_power_iteration_matches_eigvalsh_on_a_quadratic(quadratic):
    eigen = top_eigenvalues(quadratic, ["a", "b"], NO_DATA, quadratic_loss, progress=False)
    for name, block in _blocks(quadratic).items():
        assert eigen[name] == pytest.approx(_exact_top(block), rel=EIG_REL_TOL)


def test_power_iteration_matches_eigvalsh_on_least_squares():
    model, batches, loss_fn, x = least_squares()
    h = 2 * x.T @ x / x.shape[0]
    eigen = top_eigenvalues(model, ["0"], batches, loss_fn, max_iter=500, progress=False)
    assert eigen["0"] == pytest.approx(_exact_top(h), rel=EIG_REL_TOL)


def test_power_iteration_warns_when_it_runs_out_of_iterations():
    model, batches, loss_fn, _ = least_squares()
    with pytest.warns(PowerIterationWarning, match="'0' did not converge in 2 iterations"):
        top_eigenvalues(model, ["0"], batches, loss_fn, max_iter=2, rel_tol=1e-9, progress=False)


@pytest.mark.parametrize("joint", [False, True], ids=["blockwise", "joint"])
def test_hutchinson_is_within_three_standard_errors_on_a_quadratic(quadratic, joint):
    traces = hutchinson_traces(quadratic, ["a", "b"], NO_DATA, quadratic_loss, probes=200, joint=joint,
                               progress=False)
    for name, block in _blocks(quadratic).items():
        estimate, exact = traces[name], block.double().trace().item()
        assert estimate.probes == 200 and estimate.stderr > 0
        assert abs(estimate.mean - exact) <= STDERRS * estimate.stderr, (name, estimate.mean, exact)


def test_hutchinson_is_within_three_standard_errors_on_least_squares():
    model, batches, loss_fn, x = least_squares()
    exact = (2 * x.T @ x / x.shape[0]).double().trace().item()
    estimate = hutchinson_traces(model, ["0"], batches, loss_fn, probes=100, progress=False)["0"]
    assert abs(estimate.mean - exact) <= STDERRS * estimate.stderr
    assert len(estimate.history) == 100 and estimate.history[-1] == pytest.approx(estimate.mean)
    assert len(estimate.stderr_history) == 99 and estimate.stderr_history[-1] == pytest.approx(estimate.stderr)


def test_hutchinson_stderr_matches_the_rademacher_variance(quadratic):
    # Var(z^T H z) = 2 (||H||_F^2 - sum_k H_kk^2) for Rademacher z: the sample stderr must be close to it.
    block = _blocks(quadratic)["a"].double()
    exact_std = (2 * (block.pow(2).sum() - block.diagonal().pow(2).sum())).sqrt().item()
    estimate = hutchinson_traces(quadratic, ["a"], NO_DATA, quadratic_loss, probes=400, progress=False)["a"]
    assert estimate.stderr * estimate.probes**0.5 == pytest.approx(exact_std, rel=0.15)


def test_seeded_runs_repeat_and_seeds_differ(quadratic):
    def run(seed):
        return hutchinson_traces(quadratic, ["a"], NO_DATA, quadratic_loss, probes=5, seed=seed,
                                 progress=False)["a"].samples

    assert run(0) == run(0)
    assert run(0) != run(1)
    with pytest.warns(PowerIterationWarning):
        eig = [top_eigenvalues(quadratic, ["a"], NO_DATA, quadratic_loss, max_iter=3, rel_tol=1e-9, seed=seed,
                               progress=False) for seed in (0, 0, 1)]
    assert eig[0] == eig[1] != eig[2]


def test_rel_tol_stops_hutchinson_early(quadratic):
    estimate = hutchinson_traces(quadratic, ["a"], NO_DATA, quadratic_loss, probes=1000, rel_tol=0.2,
                                 progress=False)["a"]
    assert 2 <= estimate.probes < 1000
    assert estimate.stderr <= 0.2 * abs(estimate.mean)


@pytest.mark.parametrize("call,match", [
    (lambda m: top_eigenvalues(m, ["a"], NO_DATA, quadratic_loss, max_iter=0), "max_iter >= 1"),
    (lambda m: hutchinson_traces(m, ["a"], NO_DATA, quadratic_loss, probes=1), "probes >= 2"),
    (lambda m: top_eigenvalues(m, ["nope"], NO_DATA, quadratic_loss), "no module 'nope' in Quadratic"),
    (lambda m: top_eigenvalues(m, [""], NO_DATA, quadratic_loss), "'' .*has no float weight"),
    (lambda m: top_eigenvalues(m, "a", NO_DATA, quadratic_loss), "sequence of names"),
    (lambda m: top_eigenvalues(m, ["a"], [], quadratic_loss), "no batches"),
], ids=["max-iter", "probes", "unknown", "no-weight", "string", "no-batches"])
def test_errors_name_the_problem(quadratic, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(quadratic)
