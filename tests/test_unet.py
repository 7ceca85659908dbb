"""Tests for notebook 03's U-Net noise predictor in ddpm_helpers."""

import io
import math

import pytest
import torch

from ddpm_helpers import (
    BLOCK_TYPES,
    DEFAULT_UNET_CONFIG,
    QUICK_UNET_CONFIG,
    Attention,
    LinearAttention,
    UNet,
    count_parameters,
    sinusoidal_embedding,
)

SMALL = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, norm_groups=4, dropout=0.0)


def small_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**SMALL, "image_size": 28, "attention_resolutions": [14], **overrides})


def batch(model: UNet, size: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    c, s = model.config["image_channels"], model.config["image_size"]
    return torch.randn(size, c, s, s, generator=generator), torch.randint(0, 1000, (size,), generator=generator)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
@pytest.mark.parametrize(
    "channels, size, mults, attention",
    [(1, 28, [1, 2, 2], [7]), (3, 32, [1, 2, 2], [8]), (3, 64, [1, 2, 2, 2], [8])],
)
def test_output_has_input_shape(block_type, channels, size, mults, attention):
    model = small_unet(
        image_channels=channels, image_size=size, channel_mults=mults, attention_resolutions=attention,
        linear_attention_resolutions=[size // 2], block_type=block_type,
    )  # fmt: skip
    x, t = batch(model)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_output_depends_on_t(block_type):
    model = small_unet(block_type=block_type).eval()
    x, _ = batch(model)
    with torch.no_grad():
        early = model(x, torch.tensor([0, 0]))
        late = model(x, torch.tensor([500, 999]))
    assert (early - late).abs().max() > 1e-3


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_every_parameter_gets_a_gradient(block_type):
    model = small_unet(block_type=block_type, linear_attention_resolutions=[28])
    x, t = batch(model)
    model(x, t).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_each_up_block_receives_its_mirror_down_block_output_as_skip(num_res_blocks):
    """The skip connections: down-path outputs are pushed on a stack and popped, last in first out,
    into the up path. A skip that was dropped, zeroed or taken from the wrong level fails this, although
    gradients would still reach every parameter through the main path."""
    model = small_unet(channel_mults=[1, 2, 2], attention_resolutions=[7], num_res_blocks=num_res_blocks).eval()
    pushed, received = [], []
    for level in model.down:
        for attention in level["attentions"]:
            attention.register_forward_hook(lambda module, args, output: pushed.append(output))
    for level in model.up:
        for block in level["blocks"]:
            block.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    with torch.no_grad():
        model(*batch(model))
    assert len(received) == len(pushed) == 3 * num_res_blocks
    for skip, up_input in zip(reversed(pushed), received):
        assert torch.equal(up_input[:, -skip.shape[1] :], skip)


def test_attention_kinds_are_placed_by_resolution():
    model = small_unet(attention_resolutions=[14], linear_attention_resolutions=[28])
    assert all(isinstance(a, LinearAttention) for a in model.down[0]["attentions"])
    assert all(isinstance(a, Attention) for a in model.down[1]["attentions"])
    assert isinstance(model.middle["attention"], Attention)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(base_channels=28, norm_groups=8), "norm_groups=8 does not divide the width 28"),
        (dict(image_size=30, channel_mults=[1, 2, 2]), "image_size=30 is not divisible by 2^2 = 4"),
        (dict(attention_resolutions=[8]), "attention_resolutions contains 8"),
        (dict(linear_attention_resolutions=[7]), "only passes through resolutions [28, 14]"),
        (dict(block_type="transformer"), "expected one of 'resnet', 'convnext'"),
        (dict(base_channels=9, norm_groups=1), "base_channels must be even"),
        (dict(dropout=1.0), "dropout must lie in [0, 1)"),
    ],
)
def test_invalid_configuration_says_what_to_change(overrides, message):
    with pytest.raises(ValueError) as error:
        small_unet(**overrides)
    assert message in str(error.value)


def test_group_count_message_suggests_valid_group_counts():
    with pytest.raises(ValueError, match=r"use norm_groups in \[1, 2, 4, 7, 14, 28\]"):
        small_unet(base_channels=28, norm_groups=8)


def test_wrong_input_shape_is_rejected():
    model = small_unet()
    with pytest.raises(ValueError, match=r"built for images of shape \(1, 28, 28\), got \(3, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one timestep per image"):
        model(torch.zeros(2, 1, 28, 28), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_state_dict_round_trip_gives_identical_outputs(block_type):
    model = small_unet(block_type=block_type).eval()
    buffer = io.BytesIO()
    torch.save({"config": model.config, "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)  # different initial weights, to be overwritten
    fresh = UNet(**checkpoint["config"]).eval()
    fresh.load_state_dict(checkpoint["state_dict"])
    x, t = batch(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t), model(x, t), rtol=0, atol=0)
    assert fresh.config == model.config


def test_config_is_plain_data_and_defaults_match():
    assert UNet().config == DEFAULT_UNET_CONFIG
    assert all(isinstance(v, (int, float, str, list)) for v in DEFAULT_UNET_CONFIG.values())
    assert count_parameters(UNet(**QUICK_UNET_CONFIG)) < count_parameters(UNet(**DEFAULT_UNET_CONFIG)) / 10


def test_default_attention_builds_for_any_valid_size():
    """attention_resolutions=None (the default) puts full attention at the lowest resolution, so the
    default U-Net builds for 32x32 RGB images too, not only for 28x28."""
    torch.manual_seed(0)
    model = UNet(image_channels=3, image_size=32).eval()
    assert model.config["attention_resolutions"] == [8]  # 32 -> 16 -> 8
    assert all(isinstance(a, Attention) for a in model.down[2]["attentions"])
    x, t = batch(model, size=1)
    with torch.no_grad():
        assert model(x, t).shape == (1, 3, 32, 32)
    assert UNet(**model.config).config == model.config  # the stored config rebuilds it


def test_default_28x28_unet_is_unchanged():
    """Checkpoints store model.config with attention_resolutions=[7]: the default must build the same
    modules, with the same names and parameter count, as it always has."""
    default, explicit = UNet(), UNet(**DEFAULT_UNET_CONFIG)
    assert default.config["attention_resolutions"] == [7]
    assert [type(a) for level in default.down for a in level["attentions"]] == [torch.nn.Identity] * 4 + [Attention] * 2
    assert count_parameters(default) == count_parameters(explicit) == 5_620_609
    shapes = {name: p.shape for name, p in default.state_dict().items()}
    assert shapes == {name: p.shape for name, p in explicit.state_dict().items()}


def test_impossible_attention_resolution_is_still_rejected():
    with pytest.raises(ValueError, match=r"attention_resolutions contains 7, .* resolutions \[32, 16, 8\]"):
        UNet(image_channels=3, image_size=32, attention_resolutions=[7])


def test_sinusoidal_embedding_shape_and_values():
    t = torch.tensor([0, 1, 10, 999])
    emb = sinusoidal_embedding(t, 16)
    assert emb.shape == (4, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))  # sin 0, cos 0
    torch.testing.assert_close(emb[:, 0], t.float().sin())  # first frequency is 1
    torch.testing.assert_close(emb[:, 8], t.float().cos())
    torch.testing.assert_close(emb[:, 7], (t.float() * 10_000 ** (-7 / 8)).sin())
    torch.testing.assert_close(emb.square()[:, :8] + emb.square()[:, 8:], torch.ones(4, 8))  # sin^2 + cos^2


def test_sinusoidal_embedding_rows_are_distinct():
    emb = sinusoidal_embedding(torch.arange(1000), 64)
    distances = torch.cdist(emb, emb).fill_diagonal_(math.inf)
    assert distances.min() > 0.1


def test_sinusoidal_embedding_rejects_odd_dimension():
    with pytest.raises(ValueError, match="must be even"):
        sinusoidal_embedding(torch.arange(3), 7)
