"""Beta schedules and the precomputed Schedule (notebook 01)."""

import math

import pytest
import torch

from ddpm_helpers import SCHEDULES, Schedule, beta_schedule, normal_kl


def test_linear_schedule_has_the_papers_endpoints_at_T_1000():
    betas = beta_schedule("linear", 1000)
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    steps = betas.diff()
    assert torch.allclose(steps, steps[0].expand_as(steps))  # evenly spaced


@pytest.mark.parametrize("name", ["linear", "quadratic", "sigmoid"])
def test_endpoints_scale_with_1000_over_T(name):
    assert beta_schedule(name, 200).max().item() == pytest.approx(5 * beta_schedule(name, 1000).max().item())
    assert beta_schedule(name, 200).min().item() == pytest.approx(5 * beta_schedule(name, 1000).min().item())


def test_cosine_schedule_follows_nichol_dhariwal_alpha_bar():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = torch.cumprod(1 - beta_schedule("cosine", T), 0)
    for t in (0, 1, 250, 500, 900):  # code t = paper t + 1, so alpha-bar at code t is f(t + 1) / f(0)
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert beta_schedule("cosine", T).max().item() == pytest.approx(0.999)  # clipped at the end


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 200, 50])
def test_every_schedule_adds_more_noise_over_time_and_ends_near_pure_noise(name, T):
    betas = beta_schedule(name, T)
    assert ((betas > 0) & (betas < 1)).all()
    assert (betas.diff() >= 0).all(), "beta_t must not decrease"
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert (alphas_cumprod.diff() < 0).all(), "alpha-bar_t must strictly decrease"
    assert alphas_cumprod[-1] < 1e-3, "x_T must keep almost no signal"


def test_unknown_schedule_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="linear, cosine, quadratic, sigmoid"):
        beta_schedule("exponential", 1000)


@pytest.mark.parametrize("T", [0, -5, 10.0])
def test_bad_timestep_count_is_refused(T):
    with pytest.raises(ValueError, match="timesteps"):
        beta_schedule("linear", T)


def test_too_few_timesteps_for_scaled_endpoints_is_refused():
    with pytest.raises(ValueError, match="below 1"):
        beta_schedule("linear", 10)  # 0.02 * 1000 / 10 = 2


def test_schedule_quantities_match_their_definitions():
    s = Schedule.from_name("linear", 1000)
    betas = beta_schedule("linear", 1000)
    alphas_cumprod = torch.tensor([math.prod(1 - b for b in betas[: t + 1].tolist()) for t in (0, 1, 499, 999)], dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod[[0, 1, 499, 999]].double(), alphas_cumprod, rtol=1e-5)
    assert s.alphas_cumprod_prev[0] == 1 and torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert torch.allclose(s.sqrt_alphas_cumprod**2, s.alphas_cumprod)
    assert torch.allclose(s.sqrt_one_minus_alphas_cumprod**2 + s.alphas_cumprod, torch.ones(1000))
    t = 500  # beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t, eq. 7
    expected = (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t]) * s.betas[t]
    assert s.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-5)
    assert s.posterior_variance[0] == 0  # q(x_0 | x_1, x_0) is a point mass
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]  # log 0 clipped
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    x0_from = s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod  # x_0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)
    assert torch.allclose(x0_from, torch.ones(1000), atol=1e-5)


def test_schedule_gathers_a_batch_of_timesteps_for_broadcasting():
    s = Schedule.from_name("cosine", 100)
    t = torch.tensor([0, 99, 42])
    values = s.at("alphas_cumprod", t)
    assert values.shape == (3, 1, 1, 1)
    assert torch.equal(values.flatten(), s.alphas_cumprod[t])
    assert s.at("betas", t, ndim=2).shape == (3, 1)


def test_schedule_moves_between_devices_and_keeps_its_values():
    s = Schedule.from_name("sigmoid", 300)
    moved = s.to("cpu")
    assert moved.device.type == "cpu" and moved.timesteps == 300 and moved.name == "sigmoid"
    assert torch.equal(moved.posterior_mean_coef1, s.posterior_mean_coef1)


def test_prior_kl_is_small_only_when_alpha_bar_T_is_small():
    """KL(q(x_T | x_0) || N(0, I)) for a pixel at x_0 = 1."""

    def prior_kl(alpha_bar):
        return normal_kl(math.sqrt(alpha_bar), math.log(1 - alpha_bar), 0.0, 0.0).item()

    assert prior_kl(Schedule.from_name("linear", 1000).alphas_cumprod[-1].item()) < 1e-4
    # The paper's endpoints kept at T = 200 leave alpha-bar_T = exp(-sum beta) ~ 0.13: a large prior term.
    alpha_bar = torch.prod(1 - torch.linspace(1e-4, 0.02, 200, dtype=torch.float64)).item()
    assert alpha_bar == pytest.approx(0.13, abs=0.01)
    assert prior_kl(alpha_bar) > 0.05


def test_normal_kl_matches_closed_form_values():
    assert normal_kl(0.0, 0.0, 0.0, 0.0).item() == 0
    assert normal_kl(1.0, 0.0, 0.0, 0.0).item() == pytest.approx(0.5)
    # KL(N(0, 4) || N(0, 1)) = 0.5 (4 - 1 - log 4)
    assert normal_kl(0.0, math.log(4), 0.0, 0.0).item() == pytest.approx(0.5 * (3 - math.log(4)))
