"""Classifier-free guidance (Ho & Salimans 2022), proved with an exact noise predictor.

Data of K equally likely classes, x_0 | c ~ N(mu_c, s^2 I). Then x_t | c ~ N(sqrt(ab_t) mu_c, v_t I) with
v_t = ab_t s^2 + 1 - ab_t, whose score is -(x_t - sqrt(ab_t) mu_c) / v_t, and E[eps | x_t, c] is
-sqrt(1 - ab_t) times the score:

    eps(x_t, t, c) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu_c) / v_t.

Unconditionally x_t is a mixture, and eps(x_t, t, null) = sum_c p(c | x_t) eps(x_t, t, c), with the
posterior class weights p(c | x_t) a softmax of the Gaussian log-likelihoods. A correct guided sampler
driven by these must draw each class's Gaussian at w = 0 and the mixture from the null label."""

import dataclasses

import pytest
import torch
from PIL import Image
from torch import nn

import ddpm_helpers
from ddpm_helpers import (
    SHIPPED_CHECKPOINT, Schedule, TrainConfig, UNet, beta_schedule, conditional_from_unconditional, cycled_labels, ddim_sample,
    guided_eps, load_checkpoint, main, make_ema, model_to_uint8, p_sample_loop, read_checkpoint, save_checkpoint, train,
)  # fmt: skip

MUS, S = (-0.5, 0.5), 0.2  # two classes, symmetric about 0
SCHEDULE = Schedule.from_name("linear", 1000)
N = 20_000  # 10,000 per class: the standard error of a class mean is S / 100 = 0.002


class GaussianClassesEps(nn.Module):
    """The Bayes-optimal eps_theta(x_t, t, c) for Gaussian classes; label K (null) gives the mixture's."""

    def __init__(self, schedule=SCHEDULE, mus=MUS, s=S):
        super().__init__()
        self.schedule, self.s, self.null_label = schedule, s, len(mus)
        self.register_buffer("mus", torch.tensor(mus).view(-1, 1, 1, 1, 1))  # (K, 1, C, H, W)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the samplers a device to read

    def class_eps(self, x_t, t):
        """eps(x_t, t, c) for every class c, (K, B, C, H, W), and log p(c | x_t), (K, B)."""
        alpha_bar = self.schedule.at("alphas_cumprod", t, x_t.dim())
        variance = alpha_bar * self.s**2 + 1 - alpha_bar
        centred = x_t - alpha_bar.sqrt() * self.mus
        log_likelihood = -(centred**2).flatten(2).sum(-1) / (2 * variance.flatten())  # terms equal for all c dropped
        return (1 - alpha_bar).sqrt() * centred / variance, log_likelihood.log_softmax(0)

    def forward(self, x_t, t, labels):
        eps, log_posterior = self.class_eps(x_t, t)
        mixture = torch.einsum("kb,kb...->b...", log_posterior.exp(), eps)
        conditional = eps[labels.clamp(max=self.null_label - 1), torch.arange(len(x_t))]
        return torch.where((labels == self.null_label).view(-1, 1, 1, 1), mixture, conditional)


class Recorder(GaussianClassesEps):
    """Records the batch size and labels of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, labels):
        self.calls.append(labels.clone())
        return super().forward(x_t, t, labels)


class Fixed(nn.Module):
    """A conditional model called without guidance's machinery: eps(x_t, t, labels) for fixed labels."""

    def __init__(self, model, labels):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, x_t, t):
        return self.model(x_t, t, self.labels)


ORACLE = GaussianClassesEps()
LABELS = cycled_labels(N, 2)  # 0, 1, 0, 1, ...
NULL = torch.full((N,), ORACLE.null_label)


def class_samples(x, labels=LABELS):
    return [x[labels == c].flatten() for c in range(len(MUS))]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# The guided noise prediction ------------------------------------------------------------------


def test_guidance_adds_w_times_the_implicit_classifiers_gradient():
    """(1 + w) eps_c - w eps_null = eps_c - sqrt(1 - ab_t) w grad log p(c | x_t) (Ho & Salimans, section 3.2),
    with the gradient of the exact class posterior taken here by autograd, in float64."""
    x_t = torch.linspace(-2, 2, 9).view(9, 1, 1, 1)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0])
    mus = torch.tensor(MUS, dtype=torch.float64).view(-1, 1, 1, 1, 1)
    for t in (100, 400, 800):
        alpha_bar = SCHEDULE.alphas_cumprod.double()[t]
        x = x_t.double().requires_grad_()
        log_likelihood = -((x - alpha_bar.sqrt() * mus) ** 2).flatten(2).sum(-1) / (2 * (alpha_bar * S**2 + 1 - alpha_bar))
        log_posterior = log_likelihood.log_softmax(0)[labels, torch.arange(9)]
        (gradient,) = torch.autograd.grad(log_posterior.sum(), x)
        t_batch = torch.full((9,), t)
        for w in (0.5, 3.0):
            expected = ORACLE(x_t, t_batch, labels).double() - (1 - alpha_bar).sqrt() * w * gradient
            torch.testing.assert_close(guided_eps(ORACLE, x_t, t_batch, labels, w).double(), expected, rtol=1e-4, atol=1e-5)


def test_guidance_at_the_midpoint_scales_the_conditional_eps_by_one_plus_w():
    """At x_t = 0 the two symmetric classes are equally likely, so eps_null = 0 and eps~ = (1 + w) eps_c."""
    x_t, t, labels = torch.zeros(2, 1, 1, 1), torch.full((2,), 500), torch.tensor([0, 1])
    plain = ORACLE(x_t, t, labels)
    assert (plain.flatten() * torch.tensor([-1.0, 1.0]) < 0).all()  # each class's eps points away from its mean
    torch.testing.assert_close(guided_eps(ORACLE, x_t, t, labels, 2.0), 3 * plain)


def test_guidance_is_one_forward_pass_of_the_doubled_batch_and_null_only_in_its_second_half():
    labels = torch.tensor([0, 1, 1])
    for sample in (lambda m, w: ddim_sample(m, SCHEDULE, (3, 1, 2, 2), steps=5, labels=labels, guidance=w, progress=False),
                   lambda m, w: p_sample_loop(m, Schedule.from_name("cosine", 20), (3, 1, 2, 2), labels=labels, guidance=w, progress=False)):
        guided, plain = Recorder(), Recorder()
        sample(guided, 2.0)
        sample(plain, 0.0)
        assert len(guided.calls) == len(plain.calls) in (5, 20)  # one network call per step
        for seen in guided.calls:
            assert torch.equal(seen, torch.tensor([0, 1, 1, 2, 2, 2]))  # [c, null]: the null label in the second half only
        for seen in plain.calls:
            assert torch.equal(seen, labels)  # w = 0: the plain conditional model, no null label


def test_guidance_needs_labels_and_labels_need_a_conditional_model():
    with pytest.raises(ValueError, match="guidance=1.5 needs labels"):
        ddim_sample(ORACLE, SCHEDULE, (2, 1, 1, 1), steps=3, guidance=1.5, progress=False)
    unconditional = UNet(**TINY)
    for w in (0.0, 1.5):
        with pytest.raises(ValueError, match="labels need a conditional model"):
            ddim_sample(unconditional, SCHEDULE, (2, 1, 8, 8), steps=3, labels=torch.tensor([0, 1]), guidance=w, progress=False)


# Guided sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_sampling_at_w_zero_is_the_conditional_model_bit_for_bit(sampler):
    labels = cycled_labels(64, 3)  # class 0, class 1 and the null label in turn
    if sampler == "ddpm":
        def draw(model, **guide):
            return p_sample_loop(model, SCHEDULE, (64, 1, 2, 2), generator=generator(5), progress=False, **guide)
    else:
        def draw(model, **guide):
            return ddim_sample(model, SCHEDULE, (64, 1, 2, 2), steps=20, eta=1.0, generator=generator(5), progress=False, **guide)
    assert torch.equal(draw(ORACLE, labels=labels, guidance=0.0), draw(Fixed(ORACLE, labels)))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_sampling_at_w_zero_draws_each_class(sampler):
    if sampler == "ddpm":
        x = p_sample_loop(ORACLE, SCHEDULE, (N, 1, 1, 1), generator=generator(), labels=LABELS, progress=False)
    else:
        x = ddim_sample(ORACLE, SCHEDULE, (N, 1, 1, 1), steps=200, generator=generator(), labels=LABELS, guidance=0.0, progress=False)
    for mu, samples in zip(MUS, class_samples(x)):
        assert samples.mean().item() == pytest.approx(mu, abs=0.01)  # 5 standard errors
        assert samples.std().item() == pytest.approx(S, abs=0.01)


def test_the_null_label_samples_the_mixture_like_an_unconditional_model():
    mixture = Fixed(ORACLE, NULL)  # the unconditional model eps(x_t, t, null)
    unconditional = ddim_sample(mixture, SCHEDULE, (N, 1, 1, 1), steps=100, generator=generator(), progress=False)
    assert unconditional.mean().item() == pytest.approx(0, abs=0.02)  # mixture mean 0, std sqrt(S^2 + 0.5^2) = 0.54
    assert unconditional.std().item() == pytest.approx((S**2 + 0.25) ** 0.5, abs=0.01)
    assert (unconditional > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)  # half of each class
    for w in (0.0, 3.0):  # (1 + w) eps_null - w eps_null = eps_null, up to rounding for w != 0
        guided = ddim_sample(ORACLE, SCHEDULE, (N, 1, 1, 1), steps=100, generator=generator(), labels=NULL, guidance=w, progress=False)
        torch.testing.assert_close(guided, unconditional, rtol=0, atol=0 if w == 0 else 1e-4)


def test_guidance_pushes_each_class_away_from_the_other():
    means = []
    for w in (0.0, 1.0, 4.0):
        x = ddim_sample(ORACLE, SCHEDULE, (N, 1, 1, 1), steps=100, generator=generator(), labels=LABELS, guidance=w, progress=False)
        low, high = class_samples(x)
        assert low.mean().item() == pytest.approx(-high.mean().item(), abs=0.01)  # the symmetry of the classes
        means.append(high.mean().item())
    assert means[0] == pytest.approx(MUS[1], abs=0.01)
    assert means[1] > means[0] + 0.02 and means[2] > means[1] + 0.02  # away from -0.5, by 10+ standard errors a step


# The conditional U-Net ------------------------------------------------------------------------

TINY = dict(
    image_channels=1, image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
    attention_resolutions=[], linear_attention_resolutions=[], dropout=0.0, block_type="resnet", norm_groups=4,
)  # fmt: skip
TINY_TRAINING = TrainConfig(steps=4, batch_size=8, warmup_steps=2, timesteps=50, sample_every=1000, checkpoint_every=2)
K = 3


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    return UNet(**{**TINY, **changes})


def tiny_data(n=48):
    """Images whose brightness says their class: class c is constant (c - 1) / 2, plus a little noise."""
    labels = cycled_labels(n, K)
    images = ((labels - 1) / 2).view(-1, 1, 1, 1) + 0.05 * torch.randn(n, 1, 8, 8, generator=generator())
    return images.clamp(-1, 1), labels


def test_an_unconditional_unet_is_todays_network():
    """Same parameter names and config as the shipped checkpoint's, which was written before guidance."""
    checkpoint = torch.load(SHIPPED_CHECKPOINT, weights_only=True)
    model = UNet(**checkpoint["model_config"])
    assert model.config == checkpoint["model_config"] and "num_classes" not in model.config and model.null_label is None
    assert list(model.state_dict()) == list(checkpoint["ema"])
    conditional = UNet(**checkpoint["model_config"], num_classes=10)
    assert conditional.config == {**model.config, "num_classes": 10} and conditional.null_label == 10
    assert set(conditional.state_dict()) - set(model.state_dict()) == {"class_embedding.weight"}
    assert conditional.class_embedding.weight.shape == (11, 4 * model.config["base_channels"])  # K classes + null


def test_the_class_vector_is_added_to_the_time_embedding():
    """With e_c = 0 the label changes nothing; with the (random) class embedding, the output is the unconditional
    network's with e_c added to its time embedding by hand."""
    unconditional, conditional = tiny_model(seed=1).eval(), tiny_model(seed=2, num_classes=K).eval()
    assert conditional.class_embedding.weight.std().item() == pytest.approx(1, abs=0.25)  # N(0, 1) rows, not zeros
    conditional.load_state_dict({**conditional.state_dict(), **unconditional.state_dict()})
    x, t, labels = torch.randn(4, 1, 8, 8, generator=generator()), torch.tensor([3, 10, 20, 40]), torch.tensor([0, 1, 2, K])
    hook = unconditional.time_embedding.register_forward_hook(lambda module, inputs, output: output + conditional.class_embedding(labels))
    with torch.no_grad():
        torch.testing.assert_close(conditional(x, t, labels), unconditional(x, t))
        hook.remove()
        outputs = [conditional(x, t, torch.full((4,), c)) for c in range(K + 1)]
        for a in range(K + 1):
            for b in range(a):
                assert (outputs[a] - outputs[b]).abs().max() > 1e-3
        torch.nn.init.zeros_(conditional.class_embedding.weight)
        for c in range(K + 1):
            torch.testing.assert_close(conditional(x, t, torch.full((4,), c)), unconditional(x, t), rtol=0, atol=0)


def test_the_class_embedding_trains():
    images, labels = tiny_data()
    model = tiny_model(num_classes=K)
    before = model.class_embedding.weight.detach().clone()
    result = train(model, images, TINY_TRAINING, device="cpu", progress=False, labels=labels)
    assert ((result["model"]["class_embedding.weight"][:K] - before[:K]).abs().sum(1) > 0).all()  # every class row moved


def test_a_warm_start_keeps_every_weight_of_the_unconditional_model(tmp_path):
    unconditional, state = tiny_model(seed=4), {"step": 0, "losses": [], "wall_time_s": 0.0}
    ema = make_ema(unconditional, 0.9)
    ema.update_parameters(unconditional)
    save_checkpoint(tmp_path / "plain.pt", unconditional, ema, TINY_TRAINING, state)
    model = conditional_from_unconditional(tmp_path / "plain.pt", K)
    assert model.config == {**TINY, "num_classes": K} and model.training
    weights = model.state_dict()
    assert set(weights) - set(unconditional.state_dict()) == {"class_embedding.weight"}
    for name, value in unconditional.state_dict().items():
        assert torch.equal(weights[name], value), name
    with torch.no_grad():
        model.class_embedding.weight.zero_()  # without class vectors it is the unconditional model again
        x, t = torch.randn(3, 1, 8, 8, generator=generator()), torch.tensor([0, 25, 49])
        torch.testing.assert_close(model.eval()(x, t, torch.tensor([0, 1, K])), unconditional.eval()(x, t), rtol=0, atol=0)
    save_checkpoint(tmp_path / "conditional.pt", model, make_ema(model, 0.9), TINY_TRAINING, state)
    with pytest.raises(ValueError, match="holds a conditional model already"):
        conditional_from_unconditional(tmp_path / "conditional.pt", K)


@pytest.mark.parametrize(
    "labels, message",
    [
        (None, r"conditional on 3 classes: labels must be a long tensor of shape \(2,\) with values in 0\.\.3 .*got None"),
        (torch.tensor([0, 4]), r"values in 0\.\.3 \(classes 0\.\.2, 3 = null_label\), got values from 0 to 4"),
        (torch.tensor([-1, 2]), r"values in 0\.\.3 .*got values from -1 to 2"),
        (torch.tensor([0.0, 1.0]), r"long tensor of shape \(2,\).*got torch.float32 of shape \(2,\)"),
        (torch.tensor([0, 1, 2]), r"long tensor of shape \(2,\).*got torch.int64 of shape \(3,\)"),
        ([0, 1], r"long tensor of shape \(2,\).*got list"),
    ],
)  # fmt: skip
def test_bad_labels_are_refused_with_what_was_expected(labels, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(num_classes=K)(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), labels)


def test_labels_for_an_unconditional_unet_and_bad_num_classes_are_refused():
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=None\): call it without labels"):
        tiny_model()(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes must be None .* or a positive int, got 0"):
        tiny_model(num_classes=0)


# Training with label dropout ------------------------------------------------------------------


def labels_seen_in_training(p_uncond, steps=20, batch_size=256):
    model, seen = tiny_model(num_classes=K), []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    config = dataclasses.replace(TINY_TRAINING, steps=steps, batch_size=batch_size, p_uncond=p_uncond)
    images, labels = tiny_data()
    train(model, images, config, device="cpu", progress=False, labels=labels)
    return torch.cat(seen)


def test_label_dropout_happens_at_the_configured_rate():
    seen = labels_seen_in_training(0.2)
    assert len(seen) == 20 * 256
    nulls = (seen == K).sum().item()  # binomial(5120, 0.2): mean 1024, standard deviation 28.6
    assert abs(nulls - 1024) < 4 * 28.6
    assert set(seen[seen != K].tolist()) == set(range(K))


def test_without_label_dropout_the_null_label_never_reaches_the_model():
    assert (labels_seen_in_training(0.0, steps=5) != K).all()


def test_training_batches_keep_each_image_with_its_label():
    images, labels = tiny_data(300)
    data = ddpm_helpers.TrainingSet(images, flip=True, subset=200, labels=labels)
    assert data.labels.dtype == torch.long and len(data.labels) == 200
    x0, batch_labels = data.batch(500)
    torch.testing.assert_close(x0.mean((1, 2, 3)), (batch_labels - 1) / 2, rtol=0, atol=0.05)
    assert ddpm_helpers.TrainingSet(images).labels is None and isinstance(ddpm_helpers.TrainingSet(images).batch(2), torch.Tensor)
    with pytest.raises(ValueError, match=r"labels must be a long tensor of shape \(300,\)"):
        ddpm_helpers.TrainingSet(images, labels=labels[:10])


def test_training_needs_labels_exactly_for_a_conditional_unet():
    images, labels = tiny_data()
    with pytest.raises(ValueError, match="labels were given, but the UNet is unconditional"):
        train(tiny_model(), images, TINY_TRAINING, device="cpu", progress=False, labels=labels)
    with pytest.raises(ValueError, match=r"conditional on 3 classes trains with labels: .* values in 0\.\.2"):
        train(tiny_model(num_classes=K), images, TINY_TRAINING, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"values in 0\.\.2"):  # the null label is not a class of the data
        train(tiny_model(num_classes=K), images, TINY_TRAINING, device="cpu", progress=False, labels=labels.clamp(min=1) + 1)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A tiny conditional model trained a few steps, with grids of the classes in turn, and exported."""
    folder, grids = tmp_path_factory.mktemp("conditional"), []
    images, labels = tiny_data()
    config = dataclasses.replace(TINY_TRAINING, p_uncond=0.2, sample_every=4)
    result = train(tiny_model(num_classes=K), images, config, checkpoint_path=folder / "run.pt", on_sample=lambda step, x: grids.append(x),
                   num_samples=4, device="cpu", progress=False, labels=labels)  # fmt: skip
    return ddpm_helpers.export_checkpoint(folder / "run.pt", folder / "tiny.pt"), result, grids


def test_a_conditional_unet_trains_saves_and_loads(conditional):
    path, result, grids = conditional
    assert result["step"] == 4 and result["train_config"]["p_uncond"] == 0.2 and len(grids) == 1
    raw = torch.load(path, weights_only=True)
    assert raw["model_config"] == {**TINY, "num_classes": K} and "class_embedding.weight" in raw["ema"]
    model, schedule, _ = load_checkpoint(path)
    assert model.config["num_classes"] == K and model.null_label == K
    ema = tiny_model(num_classes=K)
    ema.load_state_dict(result["ema"])
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([3, 40, 7, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, labels), ema.eval()(x, t, labels), rtol=0, atol=1e-3)  # float16 on disk


def test_resuming_with_another_p_uncond_is_refused(tmp_path):
    images, labels = tiny_data()
    config = dataclasses.replace(TINY_TRAINING, p_uncond=0.2)
    train(tiny_model(num_classes=K), images, config, checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False, labels=labels)
    with pytest.raises(ValueError, match="p_uncond: checkpoint 0.2, here 0.1"):
        train(tiny_model(num_classes=K), images, dataclasses.replace(config, p_uncond=0.1, steps=6),
              checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False, labels=labels)  # fmt: skip


def test_checkpoints_from_before_guidance_resume_and_read_p_uncond_as_the_default(tmp_path):
    path, images = tmp_path / "run.pt", tiny_data()[0]
    train(tiny_model(), images, dataclasses.replace(TINY_TRAINING, steps=2), checkpoint_path=path, device="cpu", progress=False)
    old = torch.load(path, weights_only=True)
    del old["train_config"]["p_uncond"]  # as written before guidance
    torch.save(old, path)
    assert read_checkpoint(path)["train_config"]["p_uncond"] == TrainConfig.p_uncond
    assert train(tiny_model(), images, TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)["step"] == 4


# The command line -----------------------------------------------------------------------------


def cli_sample(path, out, *options):
    main(["sample", "--checkpoint", str(path), "--num", "4", "--sampler", "ddim", "--steps", "5", "--out", str(out), "--device", "cpu", *options])


def test_cli_samples_a_label_with_guidance_or_the_classes_in_turn(conditional, tmp_path):
    path = conditional[0]
    model, schedule, _ = load_checkpoint(path)

    def expected(labels, guidance):
        return model_to_uint8(ddim_sample(model, schedule, (4, 1, 8, 8), steps=5, generator=generator(), labels=labels, guidance=guidance, progress=False))

    cli_sample(path, tmp_path / "label.pt", "--label", "1", "--guidance", "2.5")
    samples = torch.load(tmp_path / "label.pt", weights_only=True)
    assert samples.dtype == torch.uint8 and samples.shape == (4, 1, 8, 8)
    assert torch.equal(samples, expected(torch.full((4,), 1), 2.5))
    assert not torch.equal(samples, expected(torch.full((4,), 1), 0.0))  # the guidance was applied
    cli_sample(path, tmp_path / "turn.pt")
    assert torch.equal(torch.load(tmp_path / "turn.pt", weights_only=True), expected(torch.tensor([0, 1, 2, 0]), 0.0))
    cli_sample(path, tmp_path / "grid.png", "--label", "2", "--guidance", "1")
    assert Image.open(tmp_path / "grid.png").size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    with pytest.raises(SystemExit, match=r"--label must lie in 0\.\.3"):
        cli_sample(path, tmp_path / "bad.pt", "--label", "4")


@pytest.mark.parametrize("option", [["--guidance", "1"], ["--label", "0"]])
def test_cli_refuses_label_and_guidance_for_an_unconditional_checkpoint(tmp_path, option):
    model, state = tiny_model(), {"step": 0, "losses": [], "wall_time_s": 0.0}
    save_checkpoint(tmp_path / "plain.pt", model, make_ema(model, 0.9), TINY_TRAINING, state)
    with pytest.raises(SystemExit, match="holds an unconditional model: --label and --guidance need one trained with num_classes"):
        cli_sample(tmp_path / "plain.pt", tmp_path / "out.pt", *option)
    assert not (tmp_path / "out.pt").exists()


def test_cli_trains_a_conditional_model_from_an_unconditional_one(tmp_path, monkeypatch):
    images, labels = tiny_data(64)
    monkeypatch.setitem(ddpm_helpers.RECIPES, "cpu", (TINY, TINY_TRAINING))
    monkeypatch.setattr(ddpm_helpers, "load_fashion_mnist", lambda split: (images, labels))
    plain, state = tiny_model(), {"step": 0, "losses": [], "wall_time_s": 0.0}
    save_checkpoint(tmp_path / "plain.pt", plain, make_ema(plain, 0.9), TINY_TRAINING, state)
    command = ["train", "--recipe", "cpu", "--num-classes", "3", "--p-uncond", "0.25", "--out", str(tmp_path / "cfg.pt"),
               "--resume-file", str(tmp_path / "run.pt"), "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit, match="--init-from starts a conditional model from an unconditional one: give --num-classes"):
        main([*command[:3], *command[5:], "--init-from", str(tmp_path / "plain.pt")])
    main([*command, "--init-from", str(tmp_path / "plain.pt")])
    checkpoint = read_checkpoint(tmp_path / "cfg.pt")
    assert checkpoint["model_config"] == {**TINY, "num_classes": 3} and checkpoint["train_config"]["p_uncond"] == 0.25
    assert checkpoint["step"] == TINY_TRAINING.steps and checkpoint["init_from"] == {"file": str(tmp_path / "plain.pt"), "step": 0}
    with pytest.raises(ValueError, match="another model configuration: num_classes: checkpoint 3, here None"):
        main([*command[:3], *command[5:]])  # resuming the conditional run as an unconditional one


def test_guidance_moves_a_class_mean_by_the_predicted_amount():
    """A class c ~ N(mu_c, s^2) guided against a null model for N(0, s0^2): both noise predictors are affine in x_t,
    so every DDIM (eta = 0) step is an affine map and carries the Gaussian's mean and std exactly. The prediction
    below pushes (mean, std) of x_T ~ N(0, 1) through those maps in float64, from the betas alone."""
    mu, s, s0, steps, w = 0.5, 0.2, 0.6, 50, 2.0
    alpha_bar = torch.cumprod(1 - beta_schedule("linear", 1000), 0)

    def eps(mean, std, t):  # eps(x_t, t) = a x_t + b for data N(mean, std^2)
        variance = alpha_bar[t] * std**2 + 1 - alpha_bar[t]
        a = (1 - alpha_bar[t]).sqrt() / variance
        return a, -a * alpha_bar[t].sqrt() * mean

    mean, std, visited = 0.0, 1.0, ddpm_helpers.ddim_timesteps(1000, steps)
    for t, t_prev in zip(visited, visited[1:] + [-1]):
        (a_c, b_c), (a_0, b_0) = eps(mu, s, t), eps(0.0, s0, t)
        a, b = (1 + w) * a_c - w * a_0, (1 + w) * b_c - w * b_0
        prev = alpha_bar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        # x_prev = sqrt(ab_prev) (x - sqrt(1 - ab) eps) / sqrt(ab) + sqrt(1 - ab_prev) eps, with eps = a x + b
        slope = (prev / alpha_bar[t]).sqrt() * (1 - (1 - alpha_bar[t]).sqrt() * a) + (1 - prev).sqrt() * a
        shift = (-(prev / alpha_bar[t]).sqrt() * (1 - alpha_bar[t]).sqrt() + (1 - prev).sqrt()) * b
        mean, std = slope * mean + shift, slope.abs() * std

    class TwoGaussians(nn.Module):
        def __init__(self):
            super().__init__()
            self.null_label, self.anchor = 1, nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t, labels):
            ab = SCHEDULE.at("alphas_cumprod", t, x_t.dim())
            m, sd = torch.where(labels == 0, mu, 0.0).view(-1, 1, 1, 1), torch.where(labels == 0, s, s0).view(-1, 1, 1, 1)
            return (1 - ab).sqrt() * (x_t - ab.sqrt() * m) / (ab * sd**2 + 1 - ab)

    x = ddim_sample(TwoGaussians(), SCHEDULE, (N, 1, 1, 1), steps=steps, generator=generator(), labels=torch.zeros(N, dtype=torch.long),
                    guidance=w, progress=False).flatten()  # fmt: skip
    assert mean > mu + 0.05 and std < s  # the prediction itself: pushed away from the null mean 0, and narrower
    assert x.mean().item() == pytest.approx(mean.item(), abs=4 * std.item() / N**0.5)
    assert x.std().item() == pytest.approx(std.item(), rel=0.03)


def test_cli_evaluate_reports_how_often_the_classifier_agrees_with_the_requested_class(tmp_path, capsys):
    torch.manual_seed(0)
    model = UNet(**{**TINY, "image_size": 28}, num_classes=10)
    state = {"step": 0, "losses": [], "wall_time_s": 0.0}
    save_checkpoint(tmp_path / "cfg.pt", model, make_ema(model, 0.9), TINY_TRAINING, state)
    main(["evaluate", "--checkpoint", str(tmp_path / "cfg.pt"), "--num", "20", "--sampler", "ddim", "--steps", "3",
          "--label", "3", "--guidance", "1.5", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    model, schedule, _ = load_checkpoint(tmp_path / "cfg.pt")
    samples = ddim_sample(model, schedule, (20, 1, 28, 28), steps=3, generator=generator(), labels=torch.full((20,), 3), guidance=1.5, progress=False)
    classifier, _ = ddpm_helpers.load_classifier()
    predicted = ddpm_helpers.classifier_outputs(classifier, ddpm_helpers.uint8_to_model(model_to_uint8(samples))).argmax(1)
    assert "label 3, guidance w = 1.5" in out
    assert f"classifier agrees with the requested class: {(predicted == 3).double().mean():.1%}" in out
