"""Training (Algorithm 1): the loss, EMA, the loop's safeguards, checkpoints and the command line."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_helpers
from ddpm_helpers import (
    Schedule, TrainConfig, UNet, load_checkpoint, main, make_ema, p_losses, read_checkpoint, train,
)  # fmt: skip

TINY = dict(
    image_channels=1, image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
    attention_resolutions=[], linear_attention_resolutions=[], dropout=0.0, block_type="resnet", norm_groups=4,
)  # fmt: skip
TINY_TRAINING = TrainConfig(steps=4, batch_size=8, warmup_steps=2, timesteps=50, sample_every=1000, checkpoint_every=2)


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    return UNet(**{**TINY, **changes})


def tiny_images(n=32):
    generator = torch.Generator().manual_seed(0)
    return ddpm_helpers.uint8_to_model(torch.randint(0, 256, (n, 1, 8, 8), generator=generator))


class Zero(torch.nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def test_losses_compare_predicted_and_true_noise():
    schedule = Schedule.from_name("linear", 100)
    x0, noise = torch.zeros(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 5, 50, 99])
    assert p_losses(Zero(), schedule, x0, t, noise, "l2").item() == pytest.approx(noise.pow(2).mean().item())
    assert p_losses(Zero(), schedule, x0, t, noise, "mse").item() == pytest.approx(noise.pow(2).mean().item())
    assert p_losses(Zero(), schedule, x0, t, noise, "l1").item() == pytest.approx(noise.abs().mean().item())
    huber = F.smooth_l1_loss(torch.zeros_like(noise), noise).item()
    assert p_losses(Zero(), schedule, x0, t, noise, "huber").item() == pytest.approx(huber)
    per_image = p_losses(Zero(), schedule, x0, t, noise, reduction="none")
    torch.testing.assert_close(per_image, noise.pow(2).flatten(1).mean(1))


def test_loss_draws_every_timestep_including_the_first_and_last():
    seen = []

    class Recorder(Zero):
        def forward(self, x_t, t):
            seen.append(t)
            return super().forward(x_t, t)

    schedule = Schedule.from_name("linear", 30)
    p_losses(Recorder(), schedule, torch.zeros(3000, 1, 1, 1))
    assert set(torch.cat(seen).tolist()) == set(range(30))


def test_unknown_loss_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="l1, l2, mse, huber"):
        p_losses(Zero(), Schedule.from_name("linear", 100), torch.zeros(1, 1, 2, 2), loss_type="l3")


def test_a_few_steps_on_one_batch_reduce_the_loss():
    model, schedule = tiny_model(), Schedule.from_name("linear", 50)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    t, noise = torch.randint(0, 50, (16,)), torch.randn(16, 1, 8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = p_losses(model, schedule, x0, t, noise).item()
    for _ in range(40):
        loss = p_losses(model, schedule, x0, t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert p_losses(model, schedule, x0, t, noise).item() < 0.7 * first


def test_ema_moves_toward_the_model_at_the_decay_rate():
    model = tiny_model()
    ema = make_ema(model, decay=0.9)
    ema.update_parameters(model)  # the first update copies the weights
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for old, new, current in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * current)


def test_training_writes_a_checkpoint_that_round_trips(tmp_path):
    path = tmp_path / "run.pt"
    result = train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)
    assert result["step"] == 4 and len(result["losses"]) == 4
    assert not list(tmp_path.glob("*.partial"))  # written atomically
    model, schedule, checkpoint = load_checkpoint(path)
    assert schedule.timesteps == 50 and checkpoint["model_config"] == TINY and not model.training
    ema = tiny_model()
    ema.load_state_dict(result["ema"])
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    torch.testing.assert_close(model(x, t), ema.eval()(x, t), rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["step"] == 4


def test_a_checkpoint_is_flushed_to_the_file_system_before_it_replaces_the_last(tmp_path, monkeypatch):
    """On a mounted Google Drive, the flush hands the whole file to Drive's client before the rename."""
    path, flushed, fsync = tmp_path / "run.pt", [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append((os.fstat(fd).st_size, path.exists())) or fsync(fd))
    ddpm_helpers.torch_save_atomically({"step": 1}, path)
    assert flushed == [(path.stat().st_size, False)]


def test_training_resumes_its_step_count_and_optimizer_state(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)
    longer = dataclasses.replace(TINY_TRAINING, steps=6)
    result = train(tiny_model(seed=1), tiny_images(), longer, checkpoint_path=path, device="cpu", progress=False)
    assert result["step"] == 6 and len(result["losses"]) == 6
    adam_steps = {state["step"].item() for state in result["optimizer"]["state"].values()}
    assert adam_steps == {6.0}
    assert read_checkpoint(path)["step"] == 6


def test_resuming_with_another_recipe_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="lr: checkpoint 0.0002, here 0.001"):
        train(tiny_model(), tiny_images(), dataclasses.replace(TINY_TRAINING, lr=1e-3), checkpoint_path=path, device="cpu", progress=False)


def test_resuming_may_change_how_long_and_how_often_to_report(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)
    changed = dataclasses.replace(TINY_TRAINING, steps=5, sample_every=7, checkpoint_every=1)
    result = train(tiny_model(), tiny_images(), changed, checkpoint_path=path, device="cpu", progress=False)
    assert result["step"] == 5 and read_checkpoint(path)["train_config"]["checkpoint_every"] == 1


def test_a_non_finite_loss_stops_training():
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, tiny_images(), TINY_TRAINING, device="cpu", progress=False)


def test_sample_grids_come_from_the_training_loop():
    grids = []
    config = dataclasses.replace(TINY_TRAINING, sample_every=2)
    train(tiny_model(), tiny_images(), config, on_sample=lambda step, x: grids.append((step, x.shape)), num_samples=4, device="cpu", progress=False)
    assert grids == [(2, (4, 1, 8, 8)), (4, (4, 1, 8, 8))]


def test_loading_into_another_configuration_names_the_difference(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="base_channels: checkpoint 8, here 16"):
        load_checkpoint(path, model=tiny_model(base_channels=16))


def test_files_that_are_not_course_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this course"):
        read_checkpoint(tmp_path / "other.pt")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A tiny trained checkpoint, exported the way data/pretrained/ files are."""
    folder = tmp_path_factory.mktemp("ckpt")
    train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=folder / "run.pt", device="cpu", progress=False)
    return ddpm_helpers.export_checkpoint(folder / "run.pt", folder / "tiny.pt")


def test_exported_checkpoints_hold_weights_but_no_optimizer(shipped):
    checkpoint = read_checkpoint(shipped)
    assert "optimizer" not in checkpoint and {"ema", "model", "model_config", "schedule", "hardware", "wall_time_s"} <= set(checkpoint)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cli_writes_uint8_samples(shipped, tmp_path, sampler):
    out = tmp_path / "samples.pt"
    main(["sample", "--checkpoint", str(shipped), "--num", "3", "--sampler", sampler, "--steps", "5", "--out", str(out), "--device", "cpu"])
    samples = torch.load(out, weights_only=True)
    assert samples.dtype == torch.uint8 and samples.shape == (3, 1, 8, 8)


def test_cli_samples_from_the_raw_weights_when_asked(shipped, tmp_path):
    outs = {weights: tmp_path / f"{weights}.pt" for weights in ("ema", "model")}
    for weights, out in outs.items():
        main(["sample", "--checkpoint", str(shipped), "--num", "3", "--sampler", "ddim", "--steps", "5", "--out", str(out), "--device", "cpu", "--weights", weights])
    raw, schedule, _ = load_checkpoint(shipped, weights="model")
    expected = ddpm_helpers.ddim_sample(raw, schedule, (3, 1, 8, 8), steps=5, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(torch.load(outs["model"], weights_only=True), ddpm_helpers.model_to_uint8(expected))
    assert not torch.equal(torch.load(outs["model"], weights_only=True), torch.load(outs["ema"], weights_only=True))


def test_cli_writes_a_png_grid_from_the_command_line(shipped, tmp_path):
    out = tmp_path / "grid.png"
    command = [sys.executable, "ddpm_helpers.py", "sample", "--checkpoint", str(shipped), "--num", "4", "--sampler", "ddim", "--steps", "3", "--out", str(out)]
    subprocess.run(command, cwd=Path(ddpm_helpers.__file__).parent, check=True, capture_output=True)
    assert Image.open(out).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)


@pytest.mark.parametrize("recipe", ["default", "cpu"])
def test_cli_trains_a_recipe_and_exports(tmp_path, monkeypatch, recipe):
    model_config, train_config = ddpm_helpers.RECIPES[recipe]
    monkeypatch.setitem(ddpm_helpers.RECIPES, recipe, ({**TINY, "image_size": 28}, dataclasses.replace(train_config, lr=3e-4)))
    images = torch.rand(64, 1, 28, 28) * 2 - 1
    monkeypatch.setattr(ddpm_helpers, "load_fashion_mnist", lambda split: (images, torch.zeros(64, dtype=torch.long)))
    out = tmp_path / "model.pt"
    main(["train", "--recipe", recipe, "--steps", "3", "--timesteps", "50", "--out", str(out), "--resume-file", str(tmp_path / "run.pt"), "--device", "cpu"])
    checkpoint = read_checkpoint(out)
    assert checkpoint["step"] == 3 and checkpoint["train_config"]["timesteps"] == 50 and "optimizer" not in checkpoint
    assert checkpoint["train_config"]["lr"] == 3e-4 and checkpoint["train_config"]["batch_size"] == train_config.batch_size
    assert checkpoint["data"] == {"name": "fashion-mnist", "images": 64, "channels": 1, "size": 28}


def test_the_cpu_recipe_is_the_default_with_a_smaller_model_and_the_study_s_stack():
    unet_changes = {k for k, v in ddpm_helpers.CPU_UNET_CONFIG.items() if ddpm_helpers.DEFAULT_UNET_CONFIG[k] != v}
    recipe_changes = {k for k, v in dataclasses.asdict(ddpm_helpers.CPU_TRAIN_CONFIG).items() if getattr(TrainConfig(), k) != v}
    assert unet_changes == {"base_channels", "num_res_blocks"}
    assert recipe_changes == {"steps", "batch_size", "lr", "lr_decay", "ema_warmup", "min_snr_gamma"}
    assert ddpm_helpers.count_parameters(UNet(**ddpm_helpers.CPU_UNET_CONFIG)) < ddpm_helpers.count_parameters(UNet(**ddpm_helpers.DEFAULT_UNET_CONFIG)) / 5


def test_the_default_model_ships_within_20_mb_in_half_precision(tmp_path):
    torch.manual_seed(0)
    model = UNet(**ddpm_helpers.DEFAULT_UNET_CONFIG)
    state = {"step": 1, "losses": [1.0], "wall_time_s": 1.0}
    ddpm_helpers.save_checkpoint(tmp_path / "run.pt", model, make_ema(model, 0.999), TrainConfig(), state)
    shipped = ddpm_helpers.export_checkpoint(tmp_path / "run.pt", tmp_path / "shipped.pt")
    assert shipped.stat().st_size <= ddpm_helpers.MAX_SHIPPED_MB * 2**20
    checkpoint = read_checkpoint(shipped)
    assert "model" not in checkpoint and all(v.dtype == torch.float16 for v in checkpoint["ema"].values())
    loaded, _, _ = load_checkpoint(shipped)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model.eval()(x, t), rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="holds no 'model' weights"):
        load_checkpoint(shipped, weights="model")


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_mixed_precision_uses_bf16_only_on_gpus_built_for_it(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert ddpm_helpers.autocast_dtype(torch.device("cuda")) == dtype


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, None)])
def test_cpus_use_bf16_only_where_it_is_native(monkeypatch, native, dtype):
    monkeypatch.setattr(ddpm_helpers, "has_native_bf16", lambda: native)
    assert ddpm_helpers.autocast_dtype(torch.device("cpu")) == dtype
    assert ddpm_helpers.autocast_dtype(torch.device("mps")) is None


@pytest.mark.parametrize("flags, native", [("fpu sse2 avx512f avx512_bf16 avx512vl", True), ("fpu amx_bf16 amx_tile", True), ("fpu sse2 avx2 avx512f", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert ddpm_helpers.has_native_bf16(cpuinfo) is native
    assert ddpm_helpers.has_native_bf16(tmp_path / "absent") is False


def plain_algorithm_1(model, images, config):
    """Algorithm 1 written the plain way: read the loss every step, Adam without fusing, no EMA."""
    model.train()
    schedule = Schedule.from_name(config.schedule, config.timesteps)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: ddpm_helpers.learning_rate_factor(step, config))
    data = ddpm_helpers.TrainingSet(images, flip=config.flip, seed=config.seed)
    ddpm_helpers.seed_everything(config.seed)
    weights = None if config.min_snr_gamma is None else ddpm_helpers.min_snr_weights(schedule, config.min_snr_gamma)
    losses = []
    for _ in range(config.steps):
        loss = p_losses(model, schedule, data.batch(config.batch_size), loss_type=config.loss_type, loss_weights=weights)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        warmup.step()
        losses.append(loss.item())
    return losses


def test_the_fast_loop_gives_the_plain_loops_loss_curve(monkeypatch):
    """Losses read in windows, fused Adam and the EMA change nothing the loss curve shows; and
    mixed_precision=False keeps float32 even where bf16 is native (bf16 would move the losses by ~1e-3)."""
    monkeypatch.setattr(ddpm_helpers, "has_native_bf16", lambda: True)
    monkeypatch.setattr(ddpm_helpers, "LOG_EVERY", 3)
    config = dataclasses.replace(TINY_TRAINING, steps=12, lr=1e-3)
    fast = train(tiny_model(), tiny_images(), config, device="cpu", progress=False, mixed_precision=False)["losses"]
    plain = plain_algorithm_1(tiny_model(), tiny_images(), config)
    assert len(fast) == 12 and plain[-1] < plain[0]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-5, atol=0)


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path):
    straight = train(tiny_model(), tiny_images(), TINY_TRAINING, device="cpu", progress=False, mixed_precision=False)
    half = dataclasses.replace(TINY_TRAINING, steps=2)
    train(tiny_model(), tiny_images(), half, checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False, mixed_precision=False)
    resumed = train(tiny_model(seed=1), tiny_images(), TINY_TRAINING, checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False, mixed_precision=False)
    assert resumed["losses"] == straight["losses"]  # the same batches, timesteps and noise after the resume
    for key, weight in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][key], weight, rtol=0, atol=0)


def test_a_late_non_finite_loss_stops_training_before_it_is_saved(tmp_path, monkeypatch):
    """Losses are read every LOG_EVERY steps: a NaN at step 4 is caught by the read after step 6, and
    the checkpoint due at step 6 is never written with the ruined weights."""
    monkeypatch.setattr(ddpm_helpers, "LOG_EVERY", 3)
    model, calls = tiny_model(), []

    def poison_step_4(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 5 else output

    model.register_forward_hook(poison_step_4)
    config = dataclasses.replace(TINY_TRAINING, steps=10, checkpoint_every=6)
    with pytest.raises(FloatingPointError, match="the loss became nan at step 4"):
        train(model, tiny_images(), config, checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False)
    assert not (tmp_path / "run.pt").exists()


def test_training_images_stay_8_bit_on_the_device_and_batches_flip_half_the_time():
    images = torch.linspace(-1, 1, 28).repeat(512, 1, 28, 1)  # every row a ramp from black to white
    data = ddpm_helpers.TrainingSet(images, flip=True)
    assert data.pixels.dtype == torch.uint8 and len(data) == 512
    torch.manual_seed(0)
    batch = data.batch(4000)
    flipped = (batch[:, 0, 0, 0] > 0).float().mean().item()  # a mirrored ramp starts white
    assert 0.45 < flipped < 0.55
    torch.testing.assert_close(batch[0], ddpm_helpers.uint8_to_model(data.pixels[0]).flip(-1) if batch[0, 0, 0, 0] > 0 else ddpm_helpers.uint8_to_model(data.pixels[0]))
    assert (ddpm_helpers.TrainingSet(images, flip=False).batch(100)[:, 0, 0, 0] < 0).all()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ddpm_helpers.TrainingSet(images * 255)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_mixed_precision_path_trains_and_resumes_its_grad_scaler(tmp_path, monkeypatch, dtype):
    """The path a GPU takes (autocast, and a GradScaler for fp16), run on the CPU, which supports both
    dtypes: losses stay finite, the weights stay float32, and the scaler's state survives a resume."""
    monkeypatch.setattr(ddpm_helpers, "autocast_dtype", lambda device: dtype)
    path = tmp_path / "run.pt"
    train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)
    longer = dataclasses.replace(TINY_TRAINING, steps=6)
    result = train(tiny_model(), tiny_images(), longer, checkpoint_path=path, device="cpu", progress=False)
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert all(weight.dtype == torch.float32 for weight in result["model"].values() if weight.is_floating_point())
    if dtype == torch.float16:  # six unskipped steps at the initial scale: the tracker counts them all
        assert result["scaler"]["scale"] == 2.0**16 and result["scaler"]["_growth_tracker"] == 6
    else:  # bf16 has float32's range and needs no loss scaling
        assert result["scaler"] == {}


def test_later_notebooks_prefer_your_export_then_the_environment_then_the_shipped_model(tmp_path, monkeypatch, shipped, capsys):
    monkeypatch.setenv("DDPM_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("DDPM_MODEL", raising=False)
    assert ddpm_helpers.choose_model_file() == (ddpm_helpers.SHIPPED_CHECKPOINT, "shipped with the course; notebook 04 trains and exports your own")
    monkeypatch.setenv("DDPM_MODEL", str(shipped))
    assert ddpm_helpers.choose_model_file()[0] == shipped
    model, schedule, _ = ddpm_helpers.load_course_model(device="cpu")
    assert f"model: {shipped} (the file named by $DDPM_MODEL)" in capsys.readouterr().out
    assert model.config["image_size"] == 8 and schedule.timesteps == 50
    export = ddpm_helpers.student_model_path()
    assert export == tmp_path / "work" / "my_fashion_mnist_ddpm.pt"
    export.parent.mkdir()
    export.write_bytes(shipped.read_bytes())
    assert ddpm_helpers.choose_model_file() == (export, "your model, exported by notebook 04")
    monkeypatch.setenv("DDPM_MODEL", str(tmp_path / "missing.pt"))
    export.unlink()
    with pytest.raises(FileNotFoundError, match="missing.pt, which does not exist"):
        ddpm_helpers.choose_model_file()


def test_the_work_dir_defaults_to_data_checkpoints(monkeypatch):
    monkeypatch.delenv("DDPM_WORK_DIR", raising=False)
    assert ddpm_helpers.work_dir() == ddpm_helpers.DATA_DIR / "checkpoints"


# Recipe options of the CPU recipe study (notebook 04): each one changes training as its formula says.


@pytest.mark.parametrize("step, warmup_share", [(0, 0.1), (4, 0.5), (9, 1.0)])
def test_the_learning_rate_warms_up_linearly_with_either_decay(step, warmup_share):
    for decay in ddpm_helpers.LR_DECAYS:
        config = TrainConfig(steps=100, warmup_steps=10, lr_decay=decay)
        assert ddpm_helpers.learning_rate_factor(step, config) == pytest.approx(warmup_share)


@pytest.mark.parametrize("step", [10, 40, 55, 99, 150])
def test_the_cosine_decay_follows_its_formula_after_the_warm_up(step):
    config = TrainConfig(steps=100, warmup_steps=10, lr_decay="cosine")
    progress = min(1.0, (step - 10) / 90)
    assert ddpm_helpers.learning_rate_factor(step, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert ddpm_helpers.learning_rate_factor(step, dataclasses.replace(config, lr_decay="none")) == 1.0


def test_training_ends_the_cosine_decay_at_zero_learning_rate():
    config = dataclasses.replace(TINY_TRAINING, steps=6, lr_decay="cosine")
    finished = train(tiny_model(), tiny_images(), config, device="cpu", progress=False)
    assert finished["warmup"]["_last_lr"] == pytest.approx([0.0], abs=1e-12)
    constant = train(tiny_model(), tiny_images(), dataclasses.replace(config, lr_decay="none"), device="cpu", progress=False)
    assert constant["warmup"]["_last_lr"] == pytest.approx([config.lr])


def test_the_ema_warm_up_uses_decay_min_of_decay_and_one_plus_n_over_ten_plus_n():
    model = tiny_model()
    ema = make_ema(model, decay=0.999, warmup=True)
    ema.update_parameters(model)  # the first update copies the weights
    for n in (1, 2, 3):
        before = [p.detach().clone() for p in ema.module.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update_parameters(model)
        decay = (1 + n) / (10 + n)
        for old, new, current in zip(before, ema.module.parameters(), model.parameters()):
            torch.testing.assert_close(new, decay * old + (1 - decay) * current)
    assert ddpm_helpers.warmed_up_ema_decay(0.999, torch.tensor(100_000)) == pytest.approx(0.999)


def test_zero_init_output_makes_the_untrained_network_predict_zero_noise():
    config = dataclasses.replace(TINY_TRAINING, steps=1, lr=0.0, zero_init_output=True)
    x, t = tiny_images(4), torch.tensor([0, 10, 20, 49])
    plain, zeroed = tiny_model(), tiny_model()
    train(zeroed, tiny_images(), config, device="cpu", progress=False)
    assert torch.count_nonzero(zeroed.eval()(x, t)) == 0 and torch.count_nonzero(plain.eval()(x, t)) > 0


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_min_snr_weights_are_min_of_snr_and_gamma_over_snr(t):
    schedule = Schedule.from_name("linear", 1000)
    alpha_bar = float(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t])
    snr = alpha_bar / (1 - alpha_bar)
    weight = ddpm_helpers.min_snr_weights(schedule, gamma=5.0)[t]
    assert float(weight) == pytest.approx(min(snr, 5.0) / snr, rel=1e-9)


def test_min_snr_weighting_scales_each_images_loss_by_its_weight():
    schedule = Schedule.from_name("linear", 50)
    model, x0, t = tiny_model(), tiny_images(4), torch.tensor([0, 5, 25, 49])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    plain = p_losses(model, schedule, x0, t, noise, reduction="none")
    weighted = p_losses(model, schedule, x0, t, noise, reduction="none", loss_weights=ddpm_helpers.min_snr_weights(schedule, 5.0))
    snr = schedule.alphas_cumprod_float64[t] / (1 - schedule.alphas_cumprod_float64[t])
    torch.testing.assert_close(weighted, plain * (snr.clamp(max=5.0) / snr).float())
    assert weighted[0] < plain[0] / 10 and weighted[-1] == plain[-1]  # t = 0 weighs little, pure noise fully


def test_the_fast_loop_applies_every_recipe_option_like_the_plain_one(monkeypatch):
    monkeypatch.setattr(ddpm_helpers, "LOG_EVERY", 3)
    config = dataclasses.replace(TINY_TRAINING, steps=9, lr=1e-3, lr_decay="cosine", min_snr_gamma=5.0)
    fast = train(tiny_model(), tiny_images(), config, device="cpu", progress=False, mixed_precision=False)["losses"]
    plain = plain_algorithm_1(tiny_model(), tiny_images(), config)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-5, atol=0)
    unweighted = plain_algorithm_1(tiny_model(), tiny_images(), dataclasses.replace(config, min_snr_gamma=None))
    assert abs(unweighted[0] - plain[0]) > 1e-3  # the weighting changes the loss the curve shows


def test_a_run_with_every_recipe_option_resumes_exactly(tmp_path):
    """The resumed run must not zero the output layer again nor restart the EMA warm-up or the decay."""
    config = dataclasses.replace(TINY_TRAINING, lr_decay="cosine", ema_warmup=True, zero_init_output=True, min_snr_gamma=5.0)
    straight = train(tiny_model(), tiny_images(), config, device="cpu", progress=False)
    train(tiny_model(), tiny_images(), config, checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False, stop_at=2)
    resumed = train(tiny_model(seed=1), tiny_images(), config, checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False)
    assert resumed["losses"] == straight["losses"]
    for key, weight in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][key], weight, rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [({"lr_decay": "linear"}, "unknown learning-rate decay"), ({"min_snr_gamma": 0.0}, "must be positive")])
def test_unknown_recipe_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


def test_checkpoints_from_before_the_recipe_options_resume_as_todays_recipe(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny_model(), tiny_images(), dataclasses.replace(TINY_TRAINING, steps=2), checkpoint_path=path, device="cpu", progress=False)
    old = torch.load(path, weights_only=True)
    for name in ("lr_decay", "ema_warmup", "zero_init_output", "min_snr_gamma", "p_uncond"):
        del old["train_config"][name]
    torch.save(old, path)
    assert train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)["step"] == TINY_TRAINING.steps


@pytest.mark.parametrize(
    "options, expected",
    [
        ([], ("cosine", True, False, 5.0)),  # the cpu recipe as it is
        (["--lr-decay", "none", "--no-ema-warmup", "--zero-init-output", "--min-snr-gamma", "none"], ("none", False, True, None)),
        (["--min-snr-gamma", "3"], ("cosine", True, False, 3.0)),
    ],
)
def test_cli_switches_each_recipe_option_on_and_off(tmp_path, options, expected):
    recipe = ddpm_helpers.CPU_TRAIN_CONFIG  # the cases flip each option against it: no flag must keep it
    assert (recipe.lr_decay, recipe.ema_warmup, recipe.zero_init_output, recipe.min_snr_gamma) == ("cosine", True, False, 5.0)
    out = tmp_path / "model.pt"
    main(["train", "--recipe", "cpu", "--steps", "2", "--timesteps", "50", "--out", str(out), "--resume-file", str(tmp_path / "run.pt"), "--device", "cpu", *options])
    recorded = read_checkpoint(out)["train_config"]
    assert (recorded["lr_decay"], recorded["ema_warmup"], recorded["zero_init_output"], recorded["min_snr_gamma"]) == expected


def test_cli_refuses_zero_init_on_a_warm_start(tmp_path, shipped):
    with pytest.raises(SystemExit, match="would erase the output layer"):
        main(["train", "--recipe", "cpu", "--num-classes", "10", "--init-from", str(shipped), "--zero-init-output", "--out", str(tmp_path / "c.pt")])


# Planned stops: a run carried across working periods (issue 28)


def cli_train(tmp_path, monkeypatch, run, *options):
    """``train --recipe cpu`` through the command line on a tiny model and 64 random images, with the
    resumable state in ``run`` and the export in ``run``'s folder as ``model.pt``."""
    monkeypatch.setitem(ddpm_helpers.RECIPES, "cpu", ({**TINY, "image_size": 28}, ddpm_helpers.CPU_TRAIN_CONFIG))
    images = ddpm_helpers.uint8_to_model(torch.randint(0, 256, (64, 1, 28, 28), generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(ddpm_helpers, "load_fashion_mnist", lambda split: (images, torch.zeros(64, dtype=torch.long)))
    out = run.parent / "model.pt"
    main(["train", "--recipe", "cpu", "--steps", "6", "--timesteps", "50", "--out", str(out), "--resume-file", str(run), "--device", "cpu", "--fp32", *options])
    return out


def test_a_run_stopped_twice_and_resumed_through_the_cli_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """The cpu recipe decays its learning rate to zero at --steps: a resume that restarted the decay,
    the EMA warm-up or the random stream would give other weights."""
    (tmp_path / "straight").mkdir(), (tmp_path / "stopped").mkdir()
    cli_train(tmp_path, monkeypatch, tmp_path / "straight" / "run.pt")
    stopped = tmp_path / "stopped" / "run.pt"
    for stop in ("2", "4"):
        out = cli_train(tmp_path, monkeypatch, stopped, "--stop-at", stop)
        assert read_checkpoint(stopped)["step"] == int(stop) and not out.exists()  # no export before the end
        assert f"stopped as planned at step {stop} of 6" in capsys.readouterr().out
    cli_train(tmp_path, monkeypatch, stopped)
    straight, resumed = read_checkpoint(tmp_path / "straight" / "run.pt"), read_checkpoint(stopped)
    assert resumed["step"] == 6 and resumed["losses"] == straight["losses"]
    for part in ("model", "ema"):
        for key, weight in straight[part].items():
            torch.testing.assert_close(resumed[part][key], weight, rtol=0, atol=0)
    assert [(s["first_step"], s["steps"]) for s in resumed["segments"]] == [(0, 2), (2, 2), (4, 2)]
    assert all(s["wall_time_s"] > 0 and "CPU" in s["hardware"] for s in resumed["segments"])
    assert read_checkpoint(tmp_path / "stopped" / "model.pt")["step"] == 6  # exported at the end


def test_a_wall_clock_stop_saves_after_the_step_in_progress(tmp_path, monkeypatch):
    out = cli_train(tmp_path, monkeypatch, tmp_path / "run.pt", "--stop-after", "0")
    assert read_checkpoint(tmp_path / "run.pt")["step"] == 1 and not out.exists()


def test_a_planned_stop_needs_a_checkpoint_to_resume_from():
    with pytest.raises(ValueError, match="needs a checkpoint_path"):
        train(tiny_model(), tiny_images(), TINY_TRAINING, device="cpu", progress=False, stop_at=2)


def test_resuming_a_decaying_schedule_with_another_length_is_refused(tmp_path):
    """A cosine decay is planned to reach zero at `steps`; a constant rate may change its length (above)."""
    config = dataclasses.replace(TINY_TRAINING, lr_decay="cosine")
    train(tiny_model(), tiny_images(), config, checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False, stop_at=2)
    with pytest.raises(ValueError, match="planned for 4 steps, and its cosine learning-rate decay reaches zero at step 4"):
        train(tiny_model(), tiny_images(), dataclasses.replace(config, steps=8), checkpoint_path=tmp_path / "run.pt", device="cpu", progress=False)


# Resuming on another device (issue 29): Colab hands out a T4 (fp16, GradScaler on), an L4/A100 (bf16,
# scaler off) or a CPU runtime from one day to the next. The CPU writes what each would write.

DEVICES = {"cpu": None, "bf16 gpu": torch.bfloat16, "fp16 gpu": torch.float16}


def a_gpu_s_random_state(checkpoint: dict) -> dict:
    """The random state a GPU run saves: the CPU's and the GPU's (a CUDA generator's state is 16 bytes:
    its seed and its Philox offset)."""
    cuda = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    return {**checkpoint["random_state"], "cuda": cuda}


@pytest.mark.parametrize("writer", DEVICES)
@pytest.mark.parametrize("reader", DEVICES)
def test_a_run_resumes_on_any_device_from_a_checkpoint_of_any_other(tmp_path, monkeypatch, writer, reader):
    """A checkpoint written with the scaler off holds an empty scaler state: an fp16 reader starts a
    fresh scaler instead of failing; a GPU's random state resumes on a CPU."""
    path = tmp_path / "run.pt"
    monkeypatch.setattr(ddpm_helpers, "autocast_dtype", lambda device: DEVICES[writer])
    train(tiny_model(), tiny_images(), dataclasses.replace(TINY_TRAINING, steps=2), checkpoint_path=path, device="cpu", progress=False)
    if writer != "cpu":
        checkpoint = torch.load(path, weights_only=True)
        torch.save({**checkpoint, "random_state": a_gpu_s_random_state(checkpoint)}, path)
    monkeypatch.setattr(ddpm_helpers, "autocast_dtype", lambda device: DEVICES[reader])
    result = train(tiny_model(), tiny_images(), TINY_TRAINING, checkpoint_path=path, device="cpu", progress=False)
    assert result["step"] == 4 and all(math.isfinite(loss) for loss in result["losses"])
    if reader == "fp16 gpu":  # unskipped steps at the initial scale: the writer's 2 if it kept a scaler, then 2 more
        assert result["scaler"]["scale"] == 2.0**16 and result["scaler"]["_growth_tracker"] == (4 if writer == "fp16 gpu" else 2)
    else:
        assert result["scaler"] == {}


def resume_on(device, path, config, monkeypatch):
    """``_resume`` into the objects train builds, for a GPU this machine does not have: returns the
    seeds given to the GPU generators and the GPU states set while it ran."""
    model = tiny_model(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: ddpm_helpers.learning_rate_factor(step, config))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seeds, states = [], []
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "manual_seed_all", seeds.append)
        patch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": states.append(state))
        resumed = ddpm_helpers._resume(path, model, make_ema(model, config.ema_decay), optimizer, warmup, scaler, config, torch.device(device))
    assert resumed["step"] == 2
    return seeds, states


def test_a_cpu_checkpoint_resumes_on_a_gpu_with_its_generator_seeded_from_the_run(tmp_path, monkeypatch):
    """A CPU run saves no CUDA random state: the GPU's generator is seeded from the run's seed and step
    (the same every time that checkpoint resumes) and the CPU's state is restored as saved."""
    path = tmp_path / "run.pt"
    config = dataclasses.replace(TINY_TRAINING, seed=3)
    train(tiny_model(), tiny_images(), config, checkpoint_path=path, device="cpu", progress=False, stop_at=2)
    checkpoint = read_checkpoint(path)
    for _ in range(2):
        torch.manual_seed(123)
        assert resume_on("cuda", path, config, monkeypatch) == ([3 + 2], [])
        assert torch.equal(torch.get_rng_state(), checkpoint["random_state"]["cpu"])
    torch.save({**checkpoint, "random_state": a_gpu_s_random_state(checkpoint)}, path)
    seeds, states = resume_on("cuda", path, config, monkeypatch)  # a GPU's checkpoint on a GPU: its state as saved
    assert seeds == [] and len(states) == 1 and torch.equal(states[0], a_gpu_s_random_state(checkpoint)["cuda"])


# A training step that never waits for the device (issue 29): on a GPU, every read of a value into
# Python waits for all queued work; train promises one such read per LOG_EVERY steps.


class ValueReads(TorchDispatchMode):
    """Counts the operations that copy a tensor's value into Python: ``.item()``, ``bool(t)`` (``if
    t.min() < 0``), ``float(t)``, a tensor passed where an operation takes a number. On a CPU this
    mode cannot see ``.tolist()`` (the one read train means to make) nor copies from the host to a
    device, for there is no other device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_a_training_step_reads_no_value_back_from_the_device(monkeypatch, dtype):
    """Every recipe option on, a conditional model with label dropout, float32 or fp16 with its
    GradScaler: a 6-step run reads no more values than a 2-step one (set-up and the end read the same)."""
    monkeypatch.setattr(ddpm_helpers, "autocast_dtype", lambda device: dtype)
    config = dataclasses.replace(TINY_TRAINING, lr_decay="cosine", ema_warmup=True, min_snr_gamma=5.0, p_uncond=0.5)
    reads = {}
    for steps in (2, 6):
        with ValueReads() as mode:
            train(tiny_model(num_classes=3), tiny_images(), dataclasses.replace(config, steps=steps), device="cpu", progress=False, labels=torch.arange(32) % 3)
        reads[steps] = mode.count
    assert reads[6] == reads[2]


def test_min_snr_weights_are_built_once_a_run_and_indexed_on_the_device(monkeypatch):
    """They are float64 arithmetic on the CPU; built every step, a GPU would wait for their copy."""
    calls = []
    monkeypatch.setattr(ddpm_helpers, "min_snr_weights", lambda *args, built=ddpm_helpers.min_snr_weights: calls.append(args) or built(*args))
    train(tiny_model(), tiny_images(), dataclasses.replace(TINY_TRAINING, min_snr_gamma=5.0), device="cpu", progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_counts_its_updates_on_the_model_s_device_without_reading_the_count(warmup):
    """On the meta device tensors have shapes but no values: reading one fails, as a GPU would wait."""
    model = tiny_model().to("meta")
    ema = make_ema(model, decay=0.999, warmup=warmup)
    for _ in range(3):
        ema.update_parameters(model)
    assert ema.n_averaged.device.type == "meta"
