"""Samplers proved with an exact noise predictor: for data x_0 ~ N(mu, s^2 I),
E[eps | x_t] = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t), so a correct sampler
driven by it must return samples with mean mu and standard deviation s."""

import pytest
import torch
from torch import nn

from ddpm_helpers import Schedule, ddim_sample, ddim_step, ddim_timesteps, p_sample, p_sample_loop

MU, S = 0.3, 0.5


class GaussianDataEps(nn.Module):
    """The Bayes-optimal eps_theta for Gaussian data."""

    def __init__(self, schedule, mu=MU, s=S):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the samplers a device to read

    def forward(self, x_t, t):
        alpha_bar = self.schedule.at("alphas_cumprod", t, x_t.dim())
        return (1 - alpha_bar).sqrt() * (x_t - alpha_bar.sqrt() * self.mu) / (alpha_bar * self.s**2 + 1 - alpha_bar)


SCHEDULE = Schedule.from_name("linear", 1000)
MODEL = GaussianDataEps(SCHEDULE)
N = 20_000  # standard error of the mean: S / sqrt(N) = 0.0025


def assert_gaussian(x, mu=MU, s=S, tol=0.015):
    assert x.mean().item() == pytest.approx(mu, abs=tol)
    assert x.std().item() == pytest.approx(s, abs=tol)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_sampler_recovers_the_data_distribution(variance):
    x = p_sample_loop(MODEL, SCHEDULE, (N, 1, 1, 1), variance=variance, generator=torch.Generator().manual_seed(0), progress=False)
    assert_gaussian(x)


def test_ddpm_sampler_with_clipped_x0_stays_close_for_data_inside_the_clip():
    x = p_sample_loop(GaussianDataEps(SCHEDULE, 0.0, 0.2), SCHEDULE, (N, 1, 1, 1), clip_x0=True, generator=torch.Generator().manual_seed(1), progress=False)
    assert_gaussian(x, 0.0, 0.2, tol=0.02)


def test_the_last_step_adds_no_noise():
    x_t = torch.randn(8, 1, 2, 2)
    first = p_sample(MODEL, SCHEDULE, x_t, 0, generator=torch.Generator().manual_seed(1))
    second = p_sample(MODEL, SCHEDULE, x_t, 0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    assert not torch.equal(p_sample(MODEL, SCHEDULE, x_t, 1, generator=torch.Generator().manual_seed(1)),
                           p_sample(MODEL, SCHEDULE, x_t, 1, generator=torch.Generator().manual_seed(2)))


def test_return_all_gives_T_plus_one_states_starting_from_the_noise():
    schedule = Schedule.from_name("cosine", 50)
    x_T = torch.randn(3, 1, 2, 2)
    states = p_sample_loop(GaussianDataEps(schedule), schedule, (3, 1, 2, 2), x_T=x_T, return_all=True, progress=False)
    assert states.shape == (51, 3, 1, 2, 2)
    assert torch.equal(states[0], x_T)


def test_seeds_reproduce_and_differ():
    def draw(seed):
        return p_sample_loop(MODEL, SCHEDULE, (4, 1, 2, 2), generator=torch.Generator().manual_seed(seed), progress=False)

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_sampling_gives_the_model_back_in_training_mode():
    MODEL.train()
    p_sample_loop(MODEL, Schedule.from_name("linear", 30), (1, 1, 1, 1), progress=False)
    assert MODEL.training


def test_bad_sampler_arguments_are_refused():
    with pytest.raises(ValueError, match="beta, beta_tilde"):
        p_sample(MODEL, SCHEDULE, torch.zeros(1, 1, 1, 1), 5, variance="sigma")
    with pytest.raises(ValueError, match=r"0\.\.999"):
        p_sample(MODEL, SCHEDULE, torch.zeros(1, 1, 1, 1), 1000)
    with pytest.raises(ValueError, match="x_T must have shape"):
        p_sample_loop(MODEL, SCHEDULE, (2, 1, 1, 1), x_T=torch.zeros(3, 1, 1, 1))


# DDIM --------------------------------------------------------------------------------------------


def test_ddim_deterministic_with_200_steps_recovers_the_data_distribution():
    x = ddim_sample(MODEL, SCHEDULE, (N, 1, 1, 1), steps=200, eta=0.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert_gaussian(x)


def test_ddim_with_eta_one_over_all_steps_recovers_the_data_distribution():
    x = ddim_sample(MODEL, SCHEDULE, (N, 1, 1, 1), steps=1000, eta=1.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert_gaussian(x)


def test_ddim_eta_one_step_is_the_ddpm_beta_tilde_step():
    x_t = torch.randn(16, 1, 3, 3)
    for t in (1, 500, 999):
        ddpm = p_sample(MODEL, SCHEDULE, x_t, t, variance="beta_tilde", generator=torch.Generator().manual_seed(t))
        ddim = ddim_step(MODEL, SCHEDULE, x_t, t, t - 1, eta=1.0, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_given_x_T():
    x_T = torch.randn(4, 1, 2, 2)
    first = ddim_sample(MODEL, SCHEDULE, x_T.shape, steps=20, x_T=x_T, generator=torch.Generator().manual_seed(0), progress=False)
    second = ddim_sample(MODEL, SCHEDULE, x_T.shape, steps=20, x_T=x_T, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(first, second)


@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50, 333, 999, 1000])
def test_ddim_step_list_starts_at_T_minus_1_decreases_strictly_and_has_the_requested_length(steps):
    visited = ddim_timesteps(1000, steps)
    assert len(visited) == steps and visited[0] == 999
    assert all(a > b for a, b in zip(visited, visited[1:]))
    assert steps == 1 or visited[-1] == 0


def test_ddim_step_count_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"1\.\.1000"):
        ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError, match=r"1\.\.1000"):
        ddim_timesteps(1000, 0)


def test_a_failing_model_is_still_given_back_in_training_mode():
    class Broken(GaussianDataEps):
        def forward(self, x_t, t):
            raise RuntimeError("boom")

    model = Broken(SCHEDULE).train()
    with pytest.raises(RuntimeError, match="boom"):
        p_sample_loop(model, SCHEDULE, (1, 1, 1, 1), progress=False)
    assert model.training


class Overshooting(nn.Module):
    """A noise predictor whose x0_hat leaves [-1, 1] wherever x_t is large: it predicts eps = -x_t."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        return -x_t


@pytest.mark.parametrize("t, t_prev", [(999, 949), (500, 480), (20, 0), (5, -1), (0, -1)])
def test_ddim_step_with_clip_recomputes_eps_from_the_clipped_x0(t, t_prev):
    model = Overshooting()
    x_t = torch.linspace(-3, 3, 2 * 1 * 4 * 4).view(2, 1, 4, 4)
    ab = SCHEDULE.alphas_cumprod.double()
    ab_t, ab_prev = ab[t], (ab[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
    x0 = ((x_t.double() + (1 - ab_t).sqrt() * x_t.double()) / ab_t.sqrt())  # eps = -x_t in eq. 4 solved for x_0
    assert (x0.abs() > 1).any()  # the clip acts
    x0 = x0.clamp(-1, 1)
    eps = (x_t.double() - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()  # the noise the clipped x_0 implies
    expected = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    got = ddim_step(model, SCHEDULE, x_t, t, t_prev, eta=0.0, clip_x0=True)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    if t_prev == -1:  # the last step returns the clipped x_0 itself
        torch.testing.assert_close(got, x0.float(), rtol=1e-5, atol=1e-5)
        assert got.abs().max() <= 1


def test_ddim_step_without_clip_is_eq_12_with_the_raw_eps():
    model = Overshooting()
    x_t = torch.linspace(-3, 3, 16).view(1, 1, 4, 4)
    t, t_prev = 500, 480
    ab_t, ab_prev = SCHEDULE.alphas_cumprod[t], SCHEDULE.alphas_cumprod[t_prev]
    x0 = SCHEDULE.sqrt_recip_alphas_cumprod[t] * x_t - SCHEDULE.sqrt_recipm1_alphas_cumprod[t] * (-x_t)
    expected = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * (-x_t)
    assert torch.equal(ddim_step(model, SCHEDULE, x_t, t, t_prev), expected)


class NoParameters(nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def test_a_model_without_parameters_samples_on_the_schedules_device():
    schedule = Schedule.from_name("cosine", 10)
    for sampler in (lambda: p_sample_loop(NoParameters(), schedule, (2, 1, 2, 2), progress=False),
                    lambda: ddim_sample(NoParameters(), schedule, (2, 1, 2, 2), steps=3, progress=False)):
        x = sampler()
        assert x.shape == (2, 1, 2, 2) and x.device == schedule.device


def test_a_model_without_parameters_and_no_schedule_device_asks_for_device():
    from ddpm_helpers import sampling_device

    with pytest.raises(ValueError, match="device="):
        sampling_device(NoParameters())


def test_a_schedule_on_another_device_is_refused_with_a_clear_message():
    schedule = Schedule.from_name("cosine", 10).to("meta")  # a stand-in for a GPU
    for sampler in (lambda: p_sample_loop(MODEL, schedule, (2, 1, 2, 2), progress=False),
                    lambda: ddim_sample(MODEL, schedule, (2, 1, 2, 2), steps=3, progress=False)):
        with pytest.raises(ValueError, match=r"schedule is on meta but the model on cpu: call schedule\.to\('cpu'\)"):
            sampler()
    with pytest.raises(ValueError, match=r"schedule is on meta but x_t on cpu"):
        p_sample(MODEL, schedule, torch.zeros(1, 1, 1, 1), 3)
    with pytest.raises(ValueError, match=r"schedule is on meta but x_t on cpu"):
        ddim_step(MODEL, schedule, torch.zeros(1, 1, 1, 1), 3, 1)
    with pytest.raises(ValueError, match=r"model is on cpu but device='meta'"):
        p_sample_loop(MODEL, schedule, (2, 1, 2, 2), device="meta", progress=False)


def test_clipped_ddim_with_eta_one_step_is_the_clipped_ddpm_beta_tilde_step():
    # holds because eps is recomputed from the clipped x0 (with the raw eps it would not)
    model = Overshooting()
    x_t = torch.linspace(-3, 3, 32).view(2, 1, 4, 4)
    for t in (1, 500, 999):
        ddpm = p_sample(model, SCHEDULE, x_t, t, variance="beta_tilde", clip_x0=True, generator=torch.Generator().manual_seed(t))
        ddim = ddim_step(model, SCHEDULE, x_t, t, t - 1, eta=1.0, clip_x0=True, generator=torch.Generator().manual_seed(t))
        # float32 rounding, divided by sqrt(1 - alpha-bar_t) ~ 0.015 at t = 1, differs by up to 3e-4; the raw eps by > 0.9
        torch.testing.assert_close(ddim, ddpm, rtol=1e-3, atol=1e-3)
