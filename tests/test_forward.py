"""The forward process q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0) (notebook 02)."""

import pytest
import torch

from ddpm_helpers import Schedule, beta_schedule, q_posterior, q_sample

SCHEDULE = Schedule.from_name("linear", 1000)


def test_q_sample_is_the_closed_form_for_given_noise():
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    a = SCHEDULE.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(q_sample(SCHEDULE, x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


@pytest.mark.parametrize("code_t", [0, 99, 499, 999])
def test_q_sample_statistics_match_eq_4(code_t):
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    x_t = q_sample(SCHEDULE, x0, torch.full((n,), code_t)).double()
    alpha_bar = torch.cumprod(1 - beta_schedule("linear", 1000), 0)[code_t].item()  # float64
    # Tolerances scale with the quantity: 5 standard errors for the mean, and a relative one for the
    # variance, which is only 1e-4 at code t = 0 (an absolute tolerance would hide a 10% error there).
    assert x_t.mean().item() == pytest.approx(alpha_bar**0.5 * 0.7, abs=5 * ((1 - alpha_bar) / n) ** 0.5)
    assert x_t.var().item() == pytest.approx(1 - alpha_bar, rel=0.02)


def test_iterating_one_step_t_times_matches_the_closed_form():
    torch.manual_seed(1)
    s = Schedule.from_name("cosine", 50)
    n, steps = 100_000, 30
    x = torch.full((n,), -0.5)
    for beta in s.betas[:steps]:  # q(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta), eq. 2
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n)
    alpha_bar = s.alphas_cumprod[steps - 1].item()
    assert x.mean().item() == pytest.approx(-0.5 * alpha_bar**0.5, abs=0.01)
    assert x.var().item() == pytest.approx(1 - alpha_bar, rel=0.02)


def test_q_posterior_matches_bayes_rule_for_two_gaussians():
    """Multiply q(x_t | x_{t-1}) and q(x_{t-1} | x_0) and read off the Gaussian in x_{t-1}."""
    x0 = torch.tensor([0.3, -0.8, 1.0]).view(3, 1, 1, 1)
    x_t = torch.tensor([0.1, 0.5, -2.0]).view(3, 1, 1, 1)
    t = torch.tensor([1, 300, 999])
    mean, variance = q_posterior(SCHEDULE, x0, x_t, t)
    betas = beta_schedule("linear", 1000)  # float64: 1 - alpha-bar from float32 values is off by 2e-4 at t = 1
    beta, alpha = betas[t], 1 - betas[t]
    alpha_bar_prev = torch.cumprod(1 - betas, 0)[t - 1]
    precision = alpha / beta + 1 / (1 - alpha_bar_prev)
    expected_mean = (alpha.sqrt() / beta * x_t.flatten() + alpha_bar_prev.sqrt() / (1 - alpha_bar_prev) * x0.flatten()) / precision
    torch.testing.assert_close(mean.flatten().double(), expected_mean, rtol=1e-6, atol=1e-6)
    # The variance at code t = 1 (beta-tilde_2) is 5e-5: compare relatively, with no absolute tolerance.
    torch.testing.assert_close(variance.flatten().double(), 1 / precision, rtol=1e-6, atol=0)
    assert variance.shape == (3, 1, 1, 1)
    with pytest.raises(AssertionError):  # so a 10% error in beta-tilde_2 cannot pass
        torch.testing.assert_close(variance.flatten().double() * torch.tensor([1.1, 1, 1]), 1 / precision, rtol=1e-6, atol=0)


def test_q_posterior_at_the_first_step_returns_x0_exactly():
    x0, x_t = torch.rand(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    mean, variance = q_posterior(SCHEDULE, x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all()


@pytest.mark.parametrize(
    "t, message",
    [
        (torch.tensor([0, 1000]), r"0\.\.999"),
        (torch.tensor([-1, 3]), r"0\.\.999"),
        (torch.tensor([1, 2, 3]), "one per image"),
        (torch.tensor([1.0, 2.0]), "integer"),
        (torch.tensor([[1], [2]]), "1-D"),
    ],
)
def test_bad_timesteps_are_refused(t, message):
    with pytest.raises(ValueError, match=message):
        q_sample(SCHEDULE, torch.zeros(2, 1, 4, 4), t)
    with pytest.raises(ValueError, match=message):
        q_posterior(SCHEDULE, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), t)


def test_bad_images_are_refused():
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        q_sample(SCHEDULE, torch.zeros(2, 28, 28), t)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        q_sample(SCHEDULE, torch.zeros(2, 1, 4, 4, dtype=torch.long), t)
    with pytest.raises(ValueError, match="noise must have the shape"):
        q_sample(SCHEDULE, torch.zeros(2, 1, 4, 4), t, noise=torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="x_t must have the shape"):
        q_posterior(SCHEDULE, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5), t)
