"""Notebook 09: Heun and DPM-Solver++ on the probability-flow ODE, proved against its exact solution.

For data x_0 ~ N(mu, s^2 I) the best noise prediction is (tests/test_sampling.py)

    eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t).

The solvers work in y = x / sqrt(ab) and sigma = sqrt((1 - ab) / ab), where ab = 1 / (1 + sigma^2) and
sqrt(1 - ab) = sigma sqrt(ab), so eps* = sigma (y - mu) / (s^2 + sigma^2). The probability-flow ODE
dy/dsigma = eps* then says d log(y - mu) / dsigma = sigma / (s^2 + sigma^2): y - mu grows as
sqrt(s^2 + sigma^2), and from x_T at sigma_T = sigma_{T-1} (code t = T - 1) the exact answer is

    x_0 = y(0) = mu + (x_T / sqrt(ab_T) - mu) s / sqrt(s^2 + sigma_T^2).

Every deterministic sampler driven by eps* is an affine map of x_T, so its error on a few x_T spread over
[-3, 3] is its whole error. The solvers ask for fractional timesteps between the schedule's levels
(sigma_to_t="interpolate"), so the exact predictor below takes any real t, with log sigma linear in t
between levels: the continuous schedule that the helper's sigma_to_t inverts."""

import math
import re

import pytest
import torch
from torch import nn

from ddpm_helpers import (
    Schedule, TrainConfig, UNet, ddim_sample, ddim_timesteps, denoise, dpm_solver_sample, export_checkpoint, heun_sample,
    load_checkpoint, main, model_to_uint8, schedule_sigmas, sigma_to_t, solver_levels, solver_sigmas, train,
)  # fmt: skip

MU, S = 0.3, 0.5
SCHEDULE = Schedule.from_name("linear", 1000)
T = SCHEDULE.timesteps
SIGMAS = schedule_sigmas(SCHEDULE)  # float64, increasing with t
X_T = torch.linspace(-3, 3, 13, dtype=torch.float64).view(-1, 1, 1, 1)


class GaussianDataEps(nn.Module):
    """eps* at integer or fractional t, in float64."""

    def __init__(self, schedule=SCHEDULE, mu=MU, s=S):
        super().__init__()
        self.mu, self.s = mu, s
        self.log_sigmas = schedule_sigmas(schedule).log()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the samplers a device to read

    def sigma(self, t):
        lower = t.double().floor().long().clamp(max=len(self.log_sigmas) - 2)
        fraction = t.double() - lower
        return (self.log_sigmas[lower] + fraction * (self.log_sigmas[lower + 1] - self.log_sigmas[lower])).exp()

    def forward(self, x_t, t):
        alpha_bar = (1 / (1 + self.sigma(t) ** 2)).view(-1, 1, 1, 1)
        return (1 - alpha_bar).sqrt() * (x_t - alpha_bar.sqrt() * self.mu) / (alpha_bar * self.s**2 + 1 - alpha_bar)


class Recorder(nn.Module):
    """Wraps a model and records the timesteps (and labels) of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    @property
    def null_label(self):
        return self.model.null_label

    def forward(self, x_t, t, *labels):
        self.calls.append((t.clone(), *(label.clone() for label in labels)))
        return self.model(x_t, t, *labels)


class Zero(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


EXACT = GaussianDataEps()


def exact_x0(x_T, sigma_T=SIGMAS[-1].item()):
    return MU + (x_T * math.sqrt(1 + sigma_T**2) - MU) * S / math.sqrt(S**2 + sigma_T**2)


SOLVERS = {
    "DDIM": lambda steps, **kw: ddim_sample(EXACT, SCHEDULE, X_T.shape, steps=steps, x_T=X_T, progress=False, **kw),
    "Heun": lambda steps, **kw: heun_sample(EXACT, SCHEDULE, X_T.shape, steps=steps, x_T=X_T, progress=False, **kw),
    "DPM-Solver++": lambda steps, **kw: dpm_solver_sample(EXACT, SCHEDULE, X_T.shape, steps=steps, x_T=X_T, progress=False, **kw),
}


def error(solver: str, steps: int, **options) -> float:
    return (SOLVERS[solver](steps, **options) - exact_x0(X_T)).abs().max().item()


# The exact answer ------------------------------------------------------------------------------


def test_the_closed_form_solves_the_probability_flow_ode():
    """dy/dsigma of the closed form, by central differences, is eps* at the levels the model knows."""
    y_T = 2.0
    for t in (0, 10, 300, 999):
        sigma = SIGMAS[t].item()

        def y(sig):
            return MU + (y_T - MU) * math.sqrt(S**2 + sig**2) / math.sqrt(S**2 + SIGMAS[-1].item() ** 2)

        slope = (y(sigma * (1 + 1e-4)) - y(sigma * (1 - 1e-4))) / (2e-4 * sigma)
        x = torch.tensor(y(sigma) / math.sqrt(1 + sigma**2), dtype=torch.float64).view(1, 1, 1, 1)
        assert EXACT(x, torch.tensor([t])).item() == pytest.approx(slope, rel=1e-6)


def test_the_exact_predictor_is_eps_star_at_the_levels_and_interpolates_log_sigma_between_them():
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    alpha_bar = SCHEDULE.alphas_cumprod_float64[t].view(-1, 1, 1, 1)
    expected = (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * MU) / (alpha_bar * S**2 + 1 - alpha_bar)
    torch.testing.assert_close(EXACT(x, t), expected, rtol=1e-12, atol=1e-12)
    halfway = EXACT.sigma(torch.tensor([10.5]))
    assert halfway.item() == pytest.approx(math.sqrt(SIGMAS[10].item() * SIGMAS[11].item()), rel=1e-12)


# Levels and timesteps ----------------------------------------------------------------------------


def test_sigma_to_t_maps_levels_to_their_timesteps_and_interpolates_in_log_sigma():
    torch.testing.assert_close(sigma_to_t(SCHEDULE, SIGMAS, "interpolate"), torch.arange(T, dtype=torch.float64))
    assert torch.equal(sigma_to_t(SCHEDULE, SIGMAS, "nearest"), torch.arange(T))
    between = torch.tensor([math.sqrt(SIGMAS[10] * SIGMAS[11]), SIGMAS[10] * 1.001, SIGMAS[11] * 0.999], dtype=torch.float64)
    assert sigma_to_t(SCHEDULE, between, "interpolate")[0].item() == pytest.approx(10.5, abs=1e-9)
    assert sigma_to_t(SCHEDULE, between[1:], "nearest").tolist() == [10, 11]
    fractional = torch.tensor([0.25, 17.5, 998.75], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(SCHEDULE, EXACT.sigma(fractional), "interpolate"), fractional)


def test_the_spacings_run_from_sigma_max_to_sigma_min_as_named():
    steps = 12
    karras, log_snr, time = (solver_sigmas(SCHEDULE, steps, spacing) for spacing in ("karras", "logSNR", "time"))
    for sigmas in (karras, log_snr, time):
        assert len(sigmas) == steps and (sigmas[1:] < sigmas[:-1]).all()
        assert sigmas[0].item() == pytest.approx(SIGMAS[-1].item(), rel=1e-12)
        assert sigmas[-1].item() == pytest.approx(SIGMAS[0].item(), rel=1e-12)
    torch.testing.assert_close(karras.pow(1 / 7).diff(), karras.pow(1 / 7).diff()[:1].expand(steps - 1))  # Karras et al. eq. 5
    torch.testing.assert_close(log_snr.log().diff(), log_snr.log().diff()[:1].expand(steps - 1))
    assert torch.equal(time, SIGMAS[ddim_timesteps(T, steps)])
    assert solver_sigmas(SCHEDULE, 1, "karras").tolist() == [SIGMAS[-1].item()]


def test_nearest_moves_each_level_onto_the_schedule_and_interpolate_keeps_it():
    nearest = solver_levels(SCHEDULE, 10, "karras", "nearest")
    assert all(isinstance(t, int) and sigma == SIGMAS[t].item() for t, sigma in nearest)
    interpolated = solver_levels(SCHEDULE, 10, "karras", "interpolate")
    assert [sigma for _, sigma in interpolated] == solver_sigmas(SCHEDULE, 10, "karras").tolist()
    assert all(isinstance(t, float) for t, _ in interpolated) and interpolated[0][0] == T - 1 and interpolated[-1][0] == 0


# Convergence against the exact answer ----------------------------------------------------------


@pytest.mark.parametrize("solver, low, high", [("DDIM", 1.8, 2.2), ("Heun", 3.5, 5.5), ("DPM-Solver++", 3.5, 5.5)])
def test_doubling_the_steps_divides_the_error_by_two_for_ddim_and_by_four_for_the_second_order_solvers(solver, low, high):
    assert low < error(solver, 20) / error(solver, 40) < high


@pytest.mark.parametrize("solver, options", [
    ("Heun", dict(spacing="time")), ("Heun", dict(spacing="logSNR")), ("Heun", dict(spacing="karras", sigma_to_t="nearest")),
    ("DPM-Solver++", dict(spacing="karras")), ("DPM-Solver++", dict(spacing="karras", sigma_to_t="nearest")),
])  # fmt: skip
def test_the_solvers_are_second_order_on_other_spacings(solver, options):
    """Karras levels are not uniform in lambda, so they also test DPM-Solver++'s step ratio r = h_previous / h."""
    assert 3.5 < error(solver, 20, **options) / error(solver, 40, **options) < 5.5
    assert error(solver, 40, **options) < error("DDIM", 40) / 4


def test_at_20_steps_the_second_order_solvers_are_closer_to_the_exact_answer_than_ddim():
    ddim = error("DDIM", 20)
    assert ddim / error("DPM-Solver++", 20) > 4  # logSNR spacing, 20 network calls
    assert ddim / error("Heun", 20, spacing="time") > 4  # 39 network calls
    assert ddim / error("Heun", 20) > 2.5  # Karras spacing: second order, but a larger constant on this problem


def test_dpm_solver_on_ddims_time_steps_is_not_yet_second_order_at_20_steps():
    """Uniform in t, the last step before x_0 (t = 52 -> 0) is a long one in lambda, and the multistep's
    linear extrapolation across it costs more than it gains: the reason the default spacing is logSNR.
    Taking that step at first order (``lower_order_final``, Lu et al.) puts the solver well ahead of DDIM."""
    assert error("DPM-Solver++", 20, spacing="time") > error("DDIM", 20) > error("DPM-Solver++", 20)
    assert error("DPM-Solver++", 20, spacing="time", lower_order_final=True) < error("DDIM", 20) / 2
    assert error("DPM-Solver++", 40, spacing="time", lower_order_final=True) < error("DPM-Solver++", 40, spacing="time") / 10


def test_lower_order_final_takes_the_step_into_sigma_min_at_first_order_and_changes_nothing_before():
    options = dict(steps=6, spacing="time", x_T=X_T, return_all=True, progress=False)
    plain, lowered = (dpm_solver_sample(EXACT, SCHEDULE, X_T.shape, lower_order_final=lof, **options) for lof in (False, True))
    torch.testing.assert_close(lowered[:-2], plain[:-2], rtol=0, atol=0)
    level, (_, sigma_min) = solver_levels(SCHEDULE, 6, "time")[-2:]
    y = lowered[-3] * math.sqrt(1 + level[1] ** 2)
    y_min = sigma_min / level[1] * y + (1 - sigma_min / level[1]) * denoise(EXACT, y, level)  # eq. 9, DPM-Solver++1
    torch.testing.assert_close(lowered[-2], y_min / math.sqrt(1 + sigma_min**2), rtol=1e-12, atol=1e-12)
    assert (lowered[-2] - plain[-2]).abs().max() > 1e-3


# Network calls and the ends of the chain -------------------------------------------------------


@pytest.mark.parametrize("options", [dict(), dict(spacing="time"), dict(sigma_to_t="nearest")])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_heun_makes_two_calls_per_step_but_one_on_the_last_from_t_T_minus_1_to_t_0(steps, options):
    recorder = Recorder(EXACT)
    heun_sample(recorder, SCHEDULE, X_T.shape, steps=steps, x_T=X_T, progress=False, **options)
    timesteps = [t[0].item() for t, *_ in recorder.calls]
    assert len(timesteps) == 2 * steps - 1
    assert timesteps[0] == T - 1 and (steps == 1 or timesteps[-1] == 0)
    assert timesteps[::2] == [t for t, _ in solver_levels(SCHEDULE, steps, options.get("spacing", "karras"), options.get("sigma_to_t", "interpolate"))]


@pytest.mark.parametrize("options", [dict(), dict(spacing="time"), dict(order=1), dict(sde=True)])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_dpm_solver_makes_one_call_per_step_from_t_T_minus_1_to_t_0(steps, options):
    recorder = Recorder(EXACT)
    dpm_solver_sample(recorder, SCHEDULE, X_T.shape, steps=steps, x_T=X_T, progress=False, **options)
    timesteps = [t[0].item() for t, *_ in recorder.calls]
    assert len(timesteps) == steps and timesteps[0] == T - 1 and timesteps[-1] == (0 if steps > 1 else T - 1)


@pytest.mark.parametrize("sample", [
    lambda m, **kw: heun_sample(m, SCHEDULE, X_T.shape, steps=6, **kw),
    lambda m, **kw: heun_sample(m, SCHEDULE, X_T.shape, steps=6, spacing="time", sigma_to_t="nearest", **kw),
    lambda m, **kw: dpm_solver_sample(m, SCHEDULE, X_T.shape, steps=6, **kw),
    lambda m, **kw: dpm_solver_sample(m, SCHEDULE, X_T.shape, steps=6, spacing="karras", sigma_to_t="nearest", **kw),
])  # fmt: skip
def test_with_no_predicted_noise_the_output_is_x_T_over_sqrt_alpha_bar_T(sample):
    """eps = 0 leaves y = x / sqrt(ab) unchanged, so x_0 = x_T / sqrt(ab_{T-1}): off by sqrt(alpha_{T-1})
    if the chain started at T - 2, and by sqrt(ab_0) if it stopped at code t = 0 instead of x_0."""
    expected = X_T / SCHEDULE.alphas_cumprod_float64[-1].sqrt()
    torch.testing.assert_close(sample(Zero(), x_T=X_T, progress=False), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sampler", [heun_sample, dpm_solver_sample])
def test_return_all_gives_the_states_from_x_T_and_the_last_step_returns_the_denoised_level_0(sampler):
    states = sampler(EXACT, SCHEDULE, X_T.shape, steps=8, x_T=X_T, return_all=True, progress=False)
    assert states.shape == (9, *X_T.shape) and torch.equal(states[0], X_T)
    sigma_0 = SIGMAS[0].item()
    y = states[-2] * math.sqrt(1 + sigma_0**2)  # the state at the last level, code t = 0
    torch.testing.assert_close(states[-1], MU + (y - MU) * S**2 / (S**2 + sigma_0**2), rtol=1e-12, atol=1e-12)


# First order is DDIM ------------------------------------------------------------------------------

TINY = dict(
    image_channels=1, image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
    attention_resolutions=[], linear_attention_resolutions=[], dropout=0.0, block_type="resnet", norm_groups=4,
)  # fmt: skip
TINY_SCHEDULE = Schedule.from_name("linear", 50)


def tiny_unet(**changes):
    torch.manual_seed(0)
    return UNet(**{**TINY, **changes}).eval()


@pytest.mark.parametrize("steps", [1, 5, 50])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_dpm_solver_of_order_one_on_ddims_steps_is_ddim(steps, clip_x0):
    model, x_T = tiny_unet().double(), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ddim = ddim_sample(model, TINY_SCHEDULE, x_T.shape, steps=steps, x_T=x_T, clip_x0=clip_x0, progress=False)
    first_order = dpm_solver_sample(model, TINY_SCHEDULE, x_T.shape, steps=steps, order=1, spacing="time", x_T=x_T, clip_x0=clip_x0, progress=False)
    torch.testing.assert_close(first_order, ddim, rtol=1e-4, atol=1e-4)
    second_order = dpm_solver_sample(model, TINY_SCHEDULE, x_T.shape, steps=steps, spacing="time", x_T=x_T, clip_x0=clip_x0, progress=False)
    assert steps < 3 or (second_order - ddim).abs().max() > 1e-3  # the multistep correction changes something


def test_dpm_solver_sde_of_order_one_is_ddim_with_eta_one_and_heun_with_one_step_is_ddim():
    model, x_T = tiny_unet(), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(model, TINY_SCHEDULE, x_T.shape, steps=10, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False)
    sde = dpm_solver_sample(model, TINY_SCHEDULE, x_T.shape, steps=10, order=1, spacing="time", sde=True, x_T=x_T,
                            generator=torch.Generator().manual_seed(2), progress=False)  # fmt: skip
    torch.testing.assert_close(sde, ddim, rtol=1e-4, atol=1e-4)
    one_step = ddim_sample(model, TINY_SCHEDULE, x_T.shape, steps=1, x_T=x_T, progress=False)
    torch.testing.assert_close(heun_sample(model, TINY_SCHEDULE, x_T.shape, steps=1, x_T=x_T, progress=False), one_step, rtol=1e-4, atol=1e-4)


def test_dpm_solver_sde_recovers_the_data_distribution_where_ddim_with_eta_one_shrinks_it():
    n = 20_000  # standard error of the mean: S / sqrt(n) = 0.0035

    def draw(**options):
        return dpm_solver_sample(EXACT, SCHEDULE, (n, 1, 1, 1), steps=20, sde=True, generator=torch.Generator().manual_seed(0), progress=False, **options)

    second_order, first_order = draw(), draw(order=1)
    assert second_order.mean().item() == pytest.approx(MU, abs=0.015)
    assert second_order.std().item() == pytest.approx(S, abs=0.025)
    assert first_order.std().item() < S - 0.08  # DDIM eta = 1 on the same 20 levels
    again = draw()
    assert torch.equal(second_order, again)


# Labels and guidance -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, calls", [(heun_sample, 2 * 4 - 1), (dpm_solver_sample, 4)])
def test_labels_and_guidance_reach_every_call_as_one_doubled_batch(sampler, calls):
    recorder = Recorder(tiny_unet(num_classes=2))
    labels = torch.tensor([0, 1, 1])
    sampler(recorder, TINY_SCHEDULE, (3, 1, 8, 8), steps=4, labels=labels, guidance=2.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(recorder.calls) == calls
    for t, called_labels in recorder.calls:
        assert torch.equal(called_labels, torch.tensor([0, 1, 1, 2, 2, 2])) and len(t) == 6


def test_guided_dpm_solver_of_order_one_is_guided_ddim():
    # in float64: guidance multiplies an untrained network's float32 rounding by 1 + w, enough to differ by 5e-4 on some CPUs
    model, x_T = tiny_unet(num_classes=2).double(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    ddim = ddim_sample(model, TINY_SCHEDULE, x_T.shape, steps=6, x_T=x_T, labels=labels, guidance=3.0, progress=False)
    ours = dpm_solver_sample(model, TINY_SCHEDULE, x_T.shape, steps=6, order=1, spacing="time", x_T=x_T, labels=labels, guidance=3.0, progress=False)
    torch.testing.assert_close(ours, ddim, rtol=1e-4, atol=1e-4)


# Refusals -------------------------------------------------------------------------------------------


def test_bad_solver_arguments_are_refused_with_the_valid_values():
    shape = (1, 1, 1, 1)
    for sampler in (heun_sample, dpm_solver_sample):
        for steps in (0, T + 1):
            with pytest.raises(ValueError, match=r"steps must lie in 1\.\.1000"):
                sampler(EXACT, SCHEDULE, shape, steps=steps, progress=False)
        with pytest.raises(ValueError, match="expected one of time, logSNR, karras"):
            sampler(EXACT, SCHEDULE, shape, spacing="quadratic", progress=False)
        with pytest.raises(ValueError, match="expected one of nearest, interpolate"):
            sampler(EXACT, SCHEDULE, shape, spacing="karras", sigma_to_t="round", progress=False)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        dpm_solver_sample(EXACT, SCHEDULE, shape, order=3, progress=False)
    with pytest.raises(ValueError, match="use fewer steps or sigma_to_t='interpolate'"):
        heun_sample(EXACT, SCHEDULE, shape, steps=200, sigma_to_t="nearest", progress=False)


# The command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A barely trained 28x28 model, exported the way data/pretrained/ files are (evaluate needs 28x28)."""
    folder = tmp_path_factory.mktemp("solvers")
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[], dropout=0.0, norm_groups=4)
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=1, timesteps=50, sample_every=1000, checkpoint_every=2)
    train(model, torch.rand(16, 1, 28, 28) * 2 - 1, config, checkpoint_path=folder / "run.pt", device="cpu", progress=False)
    return export_checkpoint(folder / "run.pt", folder / "tiny.pt")


@pytest.mark.parametrize("sampler, sample", [
    ("heun", lambda m, s, shape, g: heun_sample(m, s, shape, steps=4, generator=g, progress=False)),
    ("dpm-solver++", lambda m, s, shape, g: dpm_solver_sample(m, s, shape, steps=4, generator=g, progress=False)),
    ("dpm-solver++-sde", lambda m, s, shape, g: dpm_solver_sample(m, s, shape, steps=4, sde=True, generator=g, progress=False)),
])  # fmt: skip
def test_cli_samples_with_the_new_samplers(tiny_checkpoint, tmp_path, sampler, sample):
    out = tmp_path / "samples.pt"
    main(["sample", "--checkpoint", str(tiny_checkpoint), "--num", "3", "--sampler", sampler, "--steps", "4", "--out", str(out), "--device", "cpu"])
    model, schedule, _ = load_checkpoint(tiny_checkpoint)
    expected = model_to_uint8(sample(model, schedule, (3, 1, 28, 28), torch.Generator().manual_seed(0)))
    assert torch.equal(torch.load(out, weights_only=True), expected)


def test_cli_evaluate_names_the_solver_and_its_network_calls(tiny_checkpoint, capsys):
    main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--num", "20", "--sampler", "heun", "--steps", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "Heun (Karras et al.), 3 steps = 5 network calls" in out and re.search(r"FID samples: [0-9.]+", out)
