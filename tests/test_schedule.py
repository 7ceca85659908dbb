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
    steps = betas.diff()  # ~2e-5 each: compare relatively, as an absolute tolerance would hide errors
    torch.testing.assert_close(steps, steps[0].expand_as(steps), rtol=1e-9, atol=0)  # evenly spaced


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
    # alpha-bar_T is 4e-5: relative tolerances only (float32 rounding is a relative 6e-8)
    torch.testing.assert_close(s.alphas_cumprod[[0, 1, 499, 999]].double(), alphas_cumprod, rtol=1e-7, atol=0)
    assert s.alphas_cumprod_prev[0] == 1 and torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2, s.alphas_cumprod, rtol=1e-6, atol=0)
    assert torch.allclose(s.sqrt_one_minus_alphas_cumprod**2 + s.alphas_cumprod, torch.ones(1000))
    t = 500  # beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t, eq. 7
    expected = (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t]) * s.betas[t]
    assert s.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-5)
    assert s.posterior_variance[0] == 0  # q(x_0 | x_1, x_0) is a point mass
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]  # log 0 clipped
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    x0_from = s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod  # x_0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)
    assert torch.allclose(x0_from, torch.ones(1000), atol=1e-5)


def float64_definitions(betas):
    """Every stored quantity of Schedule, computed in float64 from the betas (index: zero-based code t)."""
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
        sqrt_recip_alphas=1 / alphas.sqrt(),
        sqrt_recip_alphas_cumprod=1 / alphas_cumprod.sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
    )


def assert_float32_of(stored, exact):
    """``stored`` (float32) is ``exact`` (float64) up to float32 rounding: a relative 2**-24, whatever the size."""
    torch.testing.assert_close(stored.double(), exact, rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 200])
def test_schedule_stores_the_float64_values_rounded_to_float32(name, T):
    s = Schedule.from_name(name, T)
    for key, exact in float64_definitions(beta_schedule(name, T)).items():
        assert getattr(s, key).dtype == torch.float32, key
        assert_float32_of(getattr(s, key), exact)


def test_a_ten_percent_error_in_the_first_beta_tilde_values_is_caught():
    """beta-tilde_2 and beta-tilde_3 are 5e-5 and 9e-5: float32 default tolerances (atol=1e-5) miss a 10% error."""
    s = Schedule.from_name("linear", 1000)
    exact = float64_definitions(beta_schedule("linear", 1000))["posterior_variance"]
    planted = exact.clone()
    planted[1:3] *= 1.1  # code t = 1, 2: the paper's beta-tilde_2, beta-tilde_3
    torch.testing.assert_close(planted.float(), s.posterior_variance)  # the loose comparison lets it through
    with pytest.raises(AssertionError):
        assert_float32_of(s.posterior_variance, planted)  # the relative one does not
    with pytest.raises(AssertionError):
        assert_float32_of(s.betas, exact * 1.1)  # nor does it miss a 10% error in beta_1 = 1e-4


@pytest.mark.parametrize("name", SCHEDULES)
def test_snr_is_computed_in_float64(name):
    s = Schedule.from_name(name, 1000)
    alphas_cumprod = torch.cumprod(1 - beta_schedule(name, 1000), 0)
    exact = alphas_cumprod / (1 - alphas_cumprod)
    assert s.snr().dtype == torch.float64
    torch.testing.assert_close(s.snr(), exact, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.to("cpu").snr(), exact, rtol=1e-12, atol=0)
    # The same ratio from the stored float32 alpha-bar is off by a relative 1e-4 near t = 1 (1 - alpha-bar
    # cancels) and by more than float64 rounding everywhere.
    from_float32 = s.alphas_cumprod.double() / (1 - s.alphas_cumprod.double())
    assert ((from_float32 / exact - 1).abs()[0]) > 1e-5
    with pytest.raises(AssertionError):
        torch.testing.assert_close(from_float32, exact, rtol=1e-12, atol=0)


def test_first_and_last_snr_in_float64():
    s = Schedule.from_name("linear", 1000)
    assert s.snr()[0].item() == pytest.approx((1 - 1e-4) / 1e-4, rel=1e-10)  # SNR at paper t = 1 is alpha_1 / beta_1
    alpha_bar_T = math.prod(1 - b for b in beta_schedule("linear", 1000).tolist())
    assert s.snr()[-1].item() == pytest.approx(alpha_bar_T / (1 - alpha_bar_T), rel=1e-12)


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
