import pytest
import torch
from torch import nn

from worker.engine.hessian import GaussNewtonTrace, HessianTrace


def _exact_block_traces(model, loss_fn):
    weights = {"0": model[0].weight, "2": model[2].weight}
    traces = {}
    for name, w in weights.items():
        original = w.detach().clone()

        def loss_of(flat):
            with torch.no_grad():
                w.copy_(original)
            params = dict(model.named_parameters())
            params[f"{name}.weight"] = flat.reshape(original.shape)
            return torch.func.functional_call(model, params, (loss_fn.x,)).log_softmax(-1).gather(
                1, loss_fn.y[:, None]).mean().neg()

        hessian = torch.autograd.functional.hessian(loss_of, original.flatten())
        traces[name] = float(hessian.diagonal().sum())
    return weights, traces


@pytest.mark.parametrize("seed", range(5))
def test_hutchinson_matches_exact_trace_within_reported_error(seed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    loss.x, loss.y = x, y
    weights, exact = _exact_block_traces(model, loss)
    blocks = {name: [w] for name, w in weights.items()}
    estimates = HessianTrace(loss, blocks, seed=seed).trace(max_samples=400, min_samples=50, rel_tol=0.02)
    for name, value in exact.items():
        estimate = estimates[name]
        assert estimate.samples >= 50
        assert estimate.stderr > 0
        # 4 standard errors: a correct estimator fails one of these checks about once in 15,000 runs.
        assert abs(estimate.mean - value) <= 4 * estimate.stderr, (name, estimate, value)


@pytest.mark.parametrize("seed", range(5))
def test_a_diagonal_hessian_is_exact_from_the_first_samples(seed):
    """With a diagonal Hessian, v.Hv = sum H_ii v_i² = Tr(H) for every Rademacher v: no variance, so sampling
    stops at the minimum with the exact trace, whatever the seed."""
    w = torch.randn(7, requires_grad=True)
    c = torch.arange(1.0, 8.0)

    def loss():
        return (c * w.pow(2)).sum()  # Hessian diag(2c)

    result = HessianTrace(loss, {"w": [w]}, seed=seed).trace(max_samples=50, min_samples=4, rel_tol=0.01)
    assert result["w"].samples == 4 and result["w"].stderr == 0
    assert result["w"].mean == pytest.approx(2 * float(c.sum()))


@pytest.mark.parametrize("seed", range(10))
def test_a_coupled_hessian_is_estimated_within_its_known_variance(seed):
    """sum((Wx)²) has Hessian 2·(I ⊗ XᵀX) in W: not diagonal, so each Rademacher sample varies, with variance
    2·Σ_{i≠j} H_ij² (Hutchinson). The mean of N samples must lie within 4 of its standard deviations over
    sqrt(N); every seed is checked, none is chosen."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(8, 3)
    gram = x.T @ x
    hessian = 2 * torch.block_diag(gram, gram)  # rows of W are independent; each row sees 2 XᵀX
    exact = float(hessian.trace())
    sd = float((2 * (hessian.pow(2).sum() - hessian.diagonal().pow(2).sum())).sqrt())

    def quadratic():
        return model(x).pow(2).sum()

    result = HessianTrace(quadratic, {"w": [model.weight]}, seed=seed).trace(max_samples=64, min_samples=64)
    assert result["w"].samples == 64
    assert abs(result["w"].mean - exact) <= 4 * sd / 64 ** 0.5


def test_sampling_stops_at_the_cap_when_the_tolerance_is_out_of_reach():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(8, 3)
    result = HessianTrace(lambda: model(x).pow(2).sum(), {"w": [model.weight]}).trace(
        max_samples=12, min_samples=4, rel_tol=1e-9)
    assert result["w"].samples == 12


@pytest.mark.parametrize("seed", range(5))
def test_gauss_newton_trace_is_the_exact_hessian_trace_of_a_fidelity_loss(seed):
    """At the reference weights a fidelity loss has zero gradient, so its Hessian is JᵀJ: the Gauss-Newton
    estimator (one ordinary backward per sample, no double backward) must match the exact trace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(10, 4)
    with torch.no_grad():
        reference = model(x)
    weights = {"0": model[0].weight, "2": model[2].weight}
    exact = {}
    for name, w in weights.items():
        original = w.detach().clone()

        def loss_of(flat, name=name, original=original):
            params = {**dict(model.named_parameters()), f"{name}.weight": flat.reshape(original.shape)}
            out = torch.func.functional_call(model, params, (x,))
            return 0.5 * (out - reference).pow(2).sum(-1).mean()

        exact[name] = float(torch.autograd.functional.hessian(loss_of, original.flatten()).diagonal().sum())

    def projection(generator):  # <f, u> with E[u uᵀ] = I / rows, the output Hessian of the loss above
        bits = torch.randint(0, 2, reference.shape, generator=generator).float() * 2 - 1
        return (model(x) * bits / len(x) ** 0.5).sum()

    blocks = {name: [w] for name, w in weights.items()}
    estimates = GaussNewtonTrace(projection, blocks, seed=seed).trace(max_samples=400, min_samples=50, rel_tol=0.02)
    for name, value in exact.items():
        assert abs(estimates[name].mean - value) <= 4 * estimates[name].stderr, (name, estimates[name], value)


def test_blocks_sum_their_tensors_and_unreached_tensors_have_zero_curvature():
    a, b, unused = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True), torch.zeros(2,
                                                                                                      requires_grad=True)

    def loss():  # Hessian diag(2, 2, 2) for a and diag(6 b) for b: traces 6 and 6 * sum(b)
        return a.pow(2).sum() + b.pow(3).sum()

    together = HessianTrace(loss, {"ab": [a, b], "unused": [unused]}).trace(max_samples=8, min_samples=4)
    assert together["ab"].mean == pytest.approx(6 + 6 * float(b.sum()), rel=1e-5)
    assert together["unused"].mean == 0.0
