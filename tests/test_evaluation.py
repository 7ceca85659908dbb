"""Notebook 07: FID from scratch, the bits/dim bound, the shipped classifier and the evaluate command."""

import json
import math
import re

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_helpers
from ddpm_helpers import (
    CLASSIFIER_CHECKPOINT, Schedule, TrainConfig, UNet, beta_schedule, classifier_accuracy, classifier_fid,
    discretized_gaussian_log_likelihood, export_checkpoint, feature_statistics, frechet_distance, load_classifier,
    load_fashion_mnist, main, prior_bpd, sqrtm_psd, train, variational_bound_bpd, vb_term_bpd,
)  # fmt: skip


def gaussian_features(n, d, mean=0.0, std=1.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std + mean


def random_covariance(d, seed):
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


# FID from scratch


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_added_noise():
    features = gaussian_features(2000, 16) ** 3  # not Gaussian, correlated through the cube
    statistics = feature_statistics(features)
    assert frechet_distance(*statistics, *statistics) == pytest.approx(0, abs=1e-8)
    noise = gaussian_features(2000, 16, seed=1)
    fids = [frechet_distance(*statistics, *feature_statistics(features + scale * noise)) for scale in (0.1, 0.3, 1, 3)]
    assert fids[0] > 0 and fids == sorted(fids) and fids[-1] > 10 * fids[0]


def test_statistics_are_the_mean_and_unbiased_covariance():
    features = gaussian_features(50, 3)
    mu, cov = feature_statistics(features)
    torch.testing.assert_close(mu, features.mean(0))
    torch.testing.assert_close(cov, torch.cov(features.T))


def test_two_large_samples_of_one_gaussian_are_near_zero_and_a_shift_is_not():
    first, second = gaussian_features(20_000, 8, seed=0), gaussian_features(20_000, 8, seed=1)
    assert frechet_distance(*feature_statistics(first), *feature_statistics(second)) < 0.01
    assert frechet_distance(*feature_statistics(first), *feature_statistics(second + 0.5)) == pytest.approx(8 * 0.25, rel=0.05)


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (1.0, 4.0), (0.25, 2.0)])
def test_shifted_isotropic_gaussians_match_the_closed_form(a, b):
    d, shift = 6, torch.linspace(-1, 1, 6, dtype=torch.float64)
    closed_form = shift.pow(2).sum().item() + d * (math.sqrt(a) - math.sqrt(b)) ** 2
    eye = torch.eye(d, dtype=torch.float64)
    assert frechet_distance(torch.zeros(d), a * eye, shift, b * eye) == pytest.approx(closed_form, rel=1e-9, abs=1e-12)
    sampled = [feature_statistics(gaussian_features(50_000, d, mean, math.sqrt(v), seed)) for mean, v, seed in ((0.0, a, 0), (shift, b, 1))]
    assert frechet_distance(*sampled[0], *sampled[1]) == pytest.approx(closed_form, abs=0.05)


def test_non_diagonal_covariances_match_a_direct_formula():
    mu1, mu2 = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    cov1, cov2 = random_covariance(2, 0), random_covariance(2, 1)
    product = cov1 @ cov2  # for a 2x2 matrix with positive eigenvalues, Tr(M^1/2) = sqrt(Tr M + 2 sqrt(det M))
    trace_root = math.sqrt(product.trace() + 2 * math.sqrt(torch.linalg.det(product)))
    direct = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_root
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(direct.item(), rel=1e-9)


def test_larger_non_diagonal_covariances_match_the_eigenvalues_of_the_product():
    d = 7
    mu1, mu2 = gaussian_features(1, d, seed=3)[0], gaussian_features(1, d, seed=4)[0]
    cov1, cov2 = random_covariance(d, 5), random_covariance(d, 6)
    trace_root = np.sqrt(np.linalg.eigvals((cov1 @ cov2).numpy()).real).sum()
    direct = ((mu1 - mu2) ** 2).sum().item() + cov1.trace().item() + cov2.trace().item() - 2 * trace_root
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(direct, rel=1e-8)


def test_the_square_root_of_a_singular_covariance_is_real_and_squares_back():
    features = gaussian_features(5, 20)  # 5 points in 20 dimensions: rank 4, tiny negative eigenvalues
    _, cov = feature_statistics(features)
    root = sqrtm_psd(cov)
    assert torch.isfinite(root).all()
    torch.testing.assert_close(root @ root, cov, atol=1e-10, rtol=1e-8)


# Bits/dim of the variational bound


def test_the_prior_term_matches_its_closed_form():
    schedule = Schedule.from_betas(torch.full((10,), 0.05))
    alpha_bar = 0.95**10
    x0 = torch.linspace(-1, 1, 2 * 3 * 4).view(2, 1, 3, 4)
    kl = 0.5 * (alpha_bar * x0.double() ** 2 + (1 - alpha_bar) - 1 - math.log(1 - alpha_bar))  # KL(N(m, s^2) || N(0, 1))
    torch.testing.assert_close(prior_bpd(schedule, x0), kl.flatten(1).mean(1) / math.log(2), rtol=1e-6, atol=0)
    linear = Schedule.from_name("linear", 1000)
    alpha_bar_T = torch.prod(1 - beta_schedule("linear", 1000)).item()
    x0 = torch.cat([x0, torch.zeros(1, 1, 3, 4)])  # where the KL is about alpha-bar_T^2 / 4: float32 would lose it
    kl = 0.5 * (alpha_bar_T * x0.double() ** 2 - alpha_bar_T - math.log1p(-alpha_bar_T))
    torch.testing.assert_close(prior_bpd(linear, x0), kl.flatten(1).mean(1) / math.log(2), rtol=1e-5, atol=0)
    assert prior_bpd(linear, x0).max() < 1e-4  # alpha-bar_T is about 4e-5 here, so L_T is about 1e-5 bits/dim


@pytest.mark.parametrize("mean", [-1.0, -0.3, 0.0, 0.51, 1.0])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.3, 2.0])
def test_the_decoder_probabilities_of_the_256_pixel_values_sum_to_one(mean, scale):
    pixels = torch.arange(256) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(pixels, torch.full((256,), mean), torch.full((256,), math.log(scale)))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_a_sharp_decoder_on_the_pixel_value_costs_no_bits_and_one_bin_off_costs_many():
    x0 = torch.tensor([0, 1, 100, 128, 254, 255]) / 127.5 - 1  # pixel values, the outermost two included
    log_scale = torch.full_like(x0, math.log(1e-4))
    assert -discretized_gaussian_log_likelihood(x0, x0, log_scale).max() < 1e-9
    one_bin_off = x0 + torch.where(x0 < 0, 2 / 255, -2 / 255)
    assert -discretized_gaussian_log_likelihood(x0, one_bin_off, log_scale).min() > 100


class TrueNoise(torch.nn.Module):
    """A perfect noise predictor: it returns the noise that made x_t."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise

    def forward(self, x_t, t):
        return self.noise


def test_the_kl_terms_vanish_when_the_model_mean_is_the_posterior_mean_with_variance_beta_tilde():
    schedule = Schedule.from_name("linear", 1000)
    x0 = torch.rand(4, 1, 5, 5) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 500, 999])
    assert vb_term_bpd(TrueNoise(noise), schedule, x0, t, "beta_tilde", noise=noise).abs().max() < 1e-6
    # with sigma_t^2 = beta_t the means still agree, so each term is KL(N(0, beta-tilde) || N(0, beta)) per pixel
    beta, beta_tilde = schedule.betas[t].double(), schedule.posterior_variance[t].double()
    expected = 0.5 * ((beta / beta_tilde).log() + beta_tilde / beta - 1) / math.log(2)
    terms = vb_term_bpd(TrueNoise(noise), schedule, x0, t, "beta", noise=noise)
    torch.testing.assert_close(terms[:2], expected[:2], rtol=1e-5, atol=0)  # relative: a 10 % error must fail
    # at large t both are ~0 and float32 rounding of the log-variances dominates: negligible in the bound
    assert ((terms - expected).abs() < 1e-5 * expected[0]).all()
    assert vb_term_bpd(TrueNoise(torch.zeros_like(noise)), schedule, x0, t, "beta_tilde", noise=noise).min() > 1e-3


def test_the_first_term_is_the_decoder():
    schedule = Schedule.from_name("linear", 1000)
    x0 = torch.randint(0, 256, (3, 1, 4, 4)) / 127.5 - 1
    noise = torch.randn_like(x0)
    t = torch.zeros(3, dtype=torch.long)
    scale = schedule.posterior_variance[1].double().sqrt()  # the decoder's scale, from x_1's step
    expected = -discretized_gaussian_log_likelihood(x0, x0, scale.log().expand_as(x0)).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(vb_term_bpd(TrueNoise(noise), schedule, x0, t, noise=noise), expected, rtol=1e-3, atol=1e-6)


def test_the_bound_sums_the_prior_and_one_term_per_timestep():
    schedule = Schedule.from_name("cosine", 20)
    model = TrueNoise(torch.zeros(2, 1, 3, 3))
    model.train()
    x0 = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 3, 3).contiguous()
    bound = variational_bound_bpd(model, schedule, x0, generator=torch.Generator().manual_seed(0), progress=False)
    assert bound["terms"].shape == (2, 20) and bound["prior"].shape == (2,)
    torch.testing.assert_close(bound["total"], bound["prior"] + bound["terms"].sum(1))
    assert (bound["terms"] >= 0).all() and model.training


class NoFloat64OffTheCpu(TorchDispatchMode):
    """Fails the moment any operation makes a float64 tensor on a device other than the CPU (Apple's
    MPS cannot hold one); counts the float64 tensors made on the CPU."""

    def __init__(self):
        super().__init__()
        self.float64_on_cpu = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                assert tensor.device.type == "cpu", f"{func} made a float64 tensor on {tensor.device}"
                self.float64_on_cpu += 1
        return out


def test_the_float64_work_of_the_bound_and_of_fid_happens_on_the_cpu(monkeypatch):
    # A stand-in accelerator: fake tensors on "cuda" carry a device and a dtype but no values, so
    # this runs without a GPU. Checks that read values (timesteps in range, images in [-1, 1]) are
    # switched off, since fake tensors have none.
    monkeypatch.setattr(ddpm_helpers, "check_timesteps", lambda *args, **kwargs: None)
    monkeypatch.setattr(ddpm_helpers, "check_images", lambda *args, **kwargs: None)
    schedule, short = Schedule.from_name("linear", 1000), Schedule.from_name("cosine", 4)
    classifier = ddpm_helpers.FashionClassifier(**ddpm_helpers.CLASSIFIER_CONFIG)
    with FakeTensorMode(allow_non_fake_inputs=True):
        device = torch.device("cuda")
        schedule, short, classifier = schedule.to(device), short.to(device), classifier.to(device).eval()
        x0 = torch.zeros(2, 1, 28, 28, device=device)
        t = torch.tensor([0, 7], device=device)
        with NoFloat64OffTheCpu() as mode:
            results = [
                ddpm_helpers.normal_kl(x0, x0, x0 + 1, torch.zeros_like(x0)),
                prior_bpd(schedule, x0),
                discretized_gaussian_log_likelihood(x0, x0, torch.full_like(x0, -3.0)),
                vb_term_bpd(TrueNoise(torch.zeros_like(x0)), schedule, x0, t),
                *variational_bound_bpd(TrueNoise(torch.zeros_like(x0)), short, x0, progress=False).values(),
                *feature_statistics(ddpm_helpers.classifier_outputs(classifier, x0, features=True)),
            ]
    assert mode.float64_on_cpu > 0
    assert all(result.device.type == "cpu" and result.dtype == torch.float64 for result in results)


# The shipped classifier


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def test_set():
    return load_fashion_mnist("test")


def test_the_shipped_classifier_is_small_accurate_and_classifies_real_images(classifier, test_set):
    model, checkpoint = classifier
    assert CLASSIFIER_CHECKPOINT.stat().st_size < 2 * 2**20
    assert checkpoint["test_accuracy"] >= 0.91
    assert {"config", "state_dict", "steps", "hardware", "wall_time_s"} <= set(checkpoint)
    images, labels = test_set
    assert (model(images[:8]).argmax(1) == labels[:8]).all()
    assert classifier_accuracy(model, images, labels) == pytest.approx(checkpoint["test_accuracy"], abs=1e-3)


def test_classifier_fid_is_zero_for_one_set_and_larger_for_noise(classifier, test_set):
    model, _ = classifier
    images = test_set[0][:300]
    assert classifier_fid(model, images, images) == pytest.approx(0, abs=1e-6)
    assert classifier_fid(model, images, test_set[0][300:600]) < classifier_fid(model, images, torch.rand_like(images) * 2 - 1)


def test_a_classifier_file_of_another_configuration_is_refused(tmp_path):
    checkpoint = torch.load(CLASSIFIER_CHECKPOINT, weights_only=True)
    checkpoint["config"] = {**checkpoint["config"], "feature_dim": 64}
    torch.save(checkpoint, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="feature_dim: checkpoint 64, here 128"):
        load_classifier(tmp_path / "other.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a classifier of this course"):
        load_classifier(tmp_path / "foreign.pt")


def test_the_train_classifier_command_writes_a_loadable_file(tmp_path, monkeypatch, capsys):
    images, labels = torch.rand(256, 1, 28, 28) * 2 - 1, torch.arange(256) % 10
    monkeypatch.setattr(ddpm_helpers, "load_fashion_mnist", lambda split: (images, labels))
    out = tmp_path / "classifier.pt"
    main(["train-classifier", "--epochs", "1", "--out", str(out), "--device", "cpu"])
    _, checkpoint = load_classifier(out)
    assert checkpoint["steps"] == 2 and checkpoint["train_config"]["epochs"] == 1
    assert f"test accuracy {checkpoint['test_accuracy']:.2%}" in capsys.readouterr().out


# The evaluate command


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A barely trained 28x28 model, exported the way data/pretrained/ files are."""
    folder = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[], dropout=0.0, norm_groups=4)
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=1, timesteps=50, sample_every=1000, checkpoint_every=2)
    train(model, images, config, checkpoint_path=folder / "run.pt", device="cpu", progress=False)
    return export_checkpoint(folder / "run.pt", folder / "tiny.pt")


def test_the_evaluate_command_prints_fid_floor_ceiling_and_time(tiny_checkpoint, capsys):
    main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--num", "40", "--sampler", "ddim", "--steps", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    number = r"([0-9]+\.[0-9]+)"
    names = ("samples", "real-data floor", "noise ceiling")
    samples, floor, ceiling = (float(re.search(f"FID {name}: {number}", out).group(1)) for name in names)
    assert float(re.search(f"time per image: {number} ms", out).group(1)) > 0
    assert "n = 40" in out and "DDIM, 3 steps" in out
    assert 0 < floor < samples and floor < ceiling


def test_evaluate_appends_its_scores_and_the_checkpoint_s_training_to_a_file(tiny_checkpoint, tmp_path, capsys):
    scores = tmp_path / "scores.jsonl"
    for eta in ("0", "1"):
        main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--num", "20", "--sampler", "ddim", "--steps", "3", "--eta", eta, "--device", "cpu", "--scores", str(scores)])
    printed = [float(value) for value in re.findall(r"FID samples: ([0-9.]+)", capsys.readouterr().out)]
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    checkpoint = ddpm_helpers.read_checkpoint(tiny_checkpoint)
    assert [line["sampler"] for line in lines] == ["DDIM, 3 steps, eta 0.0", "DDIM, 3 steps, eta 1.0"]
    assert [round(line["fid"], 3) for line in lines] == printed
    for line in lines:
        assert line["step"] == 2 and line["n"] == 20 and line["floor"] < line["ceiling"]
        assert line["loss"] == pytest.approx(sum(checkpoint["losses"]) / 2) and line["train_wall_time_s"] == checkpoint["wall_time_s"]
        assert line["segments"] == checkpoint["segments"] and "CPU" in line["hardware"]
