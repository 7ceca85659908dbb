"""Images from anywhere: a folder of your own, CIFAR-10, the colour emoji folder, and `train --data`."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_helpers
from ddpm_helpers import (
    TrainConfig, TrainingSet, UNet, load_cifar10, load_image_folder, main, nearest_neighbours, read_checkpoint, render_emoji_folder,
    train, write_test_pattern_folder,
)  # fmt: skip

RED = (255, 0, 0)
TINY_RGB = dict(
    image_channels=3, image_size=32, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
    attention_resolutions=[], linear_attention_resolutions=[], dropout=0.0, block_type="resnet", norm_groups=4,
)  # fmt: skip


def red_in_blue(path, width=40, height=20):
    """A ``width`` x ``height`` PNG, red but for a blue column at each end (outside the centred square)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[...] = RED
    pixels[:, :2] = pixels[:, -2:] = (0, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_a_wide_picture_is_cropped_to_its_centre_and_resized(tmp_path):
    red_in_blue(tmp_path / "wide.png")
    x = load_image_folder(tmp_path, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 4:-4, 4:-4], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 24, 24))
    assert x[0, 2].max() < -0.9  # the blue columns lay outside the centred square


def test_grey_is_the_luminance_and_transparency_becomes_white(tmp_path):
    Image.new("RGB", (16, 16), RED).save(tmp_path / "red.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    grey = load_image_folder(tmp_path, 8, channels=1)
    assert grey.shape == (2, 1, 8, 8)
    torch.testing.assert_close(grey[0], torch.full((1, 8, 8), 76 / 127.5 - 1))  # 0.299 x 255 = 76.2: red's luminance
    assert torch.all(load_image_folder(tmp_path, 8)[1] == 1)  # white, not the black under the transparent pixels


def test_nested_folders_any_case_and_jpeg_and_webp_are_found_in_sorted_order(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    Image.new("RGB", (8, 8), "white").save(tmp_path / "b" / "deep" / "white.JPG")
    Image.new("RGB", (8, 8), "black").save(tmp_path / "a.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_image_folder(tmp_path, 8)
    assert len(x) == 2 and x[0].max() < -0.9 and x[1].min() > 0.9  # a.webp, then b/deep/white.JPG


def test_a_corrupt_file_is_skipped_with_a_warning_that_counts_it(tmp_path):
    red_in_blue(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 image files .* broken\.png"):
        assert len(load_image_folder(tmp_path, 8)) == 1


def test_errors_say_what_was_found(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "c.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"looked for \.png, \.jpg, \.jpeg, \.webp .* found 2 \.txt, 1 \.gif"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="nothing is there"):
        load_image_folder(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="channels must be 1 .* got 4"):
        load_image_folder(tmp_path, 8, channels=4)
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_image_folder(tmp_path, 0)


def test_the_emoji_folder_holds_real_colour_images(tmp_path):
    if not ddpm_helpers.EMOJI_FONT.is_file():
        pytest.skip(f"no emoji font at {ddpm_helpers.EMOJI_FONT} (apt-get install fonts-noto-color-emoji)")
    assert render_emoji_folder(tmp_path, size=32, limit=12) == 12
    assert len(list(tmp_path.glob("u*.png"))) == 12
    x = load_image_folder(tmp_path, 32)
    assert x.shape == (12, 3, 32, 32)
    assert all(image.std() > 0.1 for image in x)  # not blank
    assert sum((image[0] - image[2]).abs().max() > 0.2 for image in x) >= 10  # colour: red and blue differ somewhere
    assert torch.all(x[:, :, 0, 0] > 0.9)  # the corners are the white background


def test_without_the_font_the_error_says_which_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        render_emoji_folder(tmp_path, font=tmp_path / "absent.ttf")


def test_the_test_patterns_are_coloured_and_differ(tmp_path):
    assert write_test_pattern_folder(tmp_path, 4, size=16) == 4
    x = load_image_folder(tmp_path, 16)
    assert x.shape == (4, 3, 16, 16) and len({image.sum().item() for image in x}) == 4
    assert all((image < 0.5).any() for image in x)  # a shape on the white


def test_nearest_neighbours_find_a_copy_at_zero_and_measure_rms_per_pixel():
    references = torch.rand(50, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    brighter = (references[7] + 0.1).clamp(max=1)
    queries = torch.stack([references[31], brighter, -torch.ones(3, 8, 8)])
    distances, indices = nearest_neighbours(queries, references, chunk=2)  # chunks of queries change nothing
    assert indices[:2].tolist() == [31, 7] and distances[0] < 1e-6
    torch.testing.assert_close(distances[1], (brighter - references[7]).double().pow(2).mean().sqrt())
    all_pairs = torch.stack([(queries[2] - r).double().pow(2).mean().sqrt() for r in references])
    assert indices[2] == all_pairs.argmin()
    torch.testing.assert_close(distances[2], all_pairs.min())
    with pytest.raises(ValueError, match="one shape"):
        nearest_neighbours(queries, references[:, :1])


@pytest.fixture
def no_cifar_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm_helpers, "DATA_DIR", tmp_path / "repo-data")
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)


def cifar_pictures(n=4):
    return np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_cifar10_downloads_once_and_is_cached_as_idx_files(no_cifar_data, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pictures = cifar_pictures()
    table = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pictures], "label": [3, 1, 4, 1]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: calls.append((hub_id, split)) or table)
    x, y = load_cifar10("test")
    assert calls == [("uoft-cs/cifar10", "test")]
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [3, 1, 4, 1]
    torch.testing.assert_close(x, torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1)  # channels first
    assert (ddpm_helpers.DATA_DIR / "cifar10" / "cifar10-test-images-idx4-ubyte.gz").is_file()
    assert torch.equal(load_cifar10("test")[0], x) and len(calls) == 1  # from the cache


def test_cifar10_is_found_in_data_dir_and_offline_the_error_says_how_to_get_it(tmp_path, no_cifar_data, monkeypatch):
    pictures = cifar_pictures().transpose(0, 3, 1, 2)
    ddpm_helpers.write_idx(tmp_path / "mine" / "cifar10-train-images-idx4-ubyte.gz", pictures)
    ddpm_helpers.write_idx(tmp_path / "mine" / "cifar10-train-labels-idx1-ubyte.gz", np.arange(4, dtype=np.uint8))
    x, y = load_cifar10("train", data_dir=tmp_path / "mine", download=False)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: (_ for _ in ()).throw(ConnectionError("no internet")))
    with pytest.raises(FileNotFoundError, match=r"download failed \(no internet\)[\s\S]*uoft-cs/cifar10[\s\S]*no Debian package"):
        load_cifar10("train")


def test_train_runs_on_a_colour_folder(tmp_path):
    write_test_pattern_folder(tmp_path, 16)
    images = load_image_folder(tmp_path, 32)
    assert len(TrainingSet(images)) == 16
    torch.manual_seed(0)
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, timesteps=50, sample_every=1000, checkpoint_every=1000)
    state = train(UNet(**TINY_RGB), images, config, device="cpu", progress=False)
    assert state["step"] == 2 and all(np.isfinite(state["losses"]))


@pytest.fixture
def tiny_recipe(monkeypatch):
    _, train_config = ddpm_helpers.RECIPES["default"]
    tiny = {**TINY_RGB, "image_channels": 1, "image_size": 28, "attention_resolutions": [14]}
    monkeypatch.setitem(ddpm_helpers.RECIPES, "default", (tiny, dataclasses.replace(train_config, batch_size=4)))


def cli_train(tmp_path, *options):
    out = tmp_path / "model.pt"
    main(["train", *options, "--steps", "2", "--timesteps", "50", "--out", str(out), "--resume-file", str(tmp_path / "run.pt"), "--device", "cpu"])
    return read_checkpoint(out)


def test_cli_trains_on_a_folder_at_the_size_asked(tmp_path, tiny_recipe):
    write_test_pattern_folder(tmp_path / "pictures", 8)
    checkpoint = cli_train(tmp_path, "--data", str(tmp_path / "pictures"), "--image-size", "16")
    config = checkpoint["model_config"]
    assert (config["image_channels"], config["image_size"], config["attention_resolutions"]) == (3, 16, [8])  # attention: same level
    assert checkpoint["step"] == 2


def test_cli_trains_on_a_folder_in_grey_when_asked_and_records_the_data(tmp_path, tiny_recipe):
    write_test_pattern_folder(tmp_path / "pictures", 8)
    checkpoint = cli_train(tmp_path, "--data", str(tmp_path / "pictures"), "--image-size", "28", "--grey")
    assert (checkpoint["model_config"]["image_channels"], checkpoint["model_config"]["image_size"]) == (1, 28)
    assert checkpoint["data"] == {"name": str(tmp_path / "pictures"), "images": 8, "channels": 1, "size": 28}
    with pytest.raises(SystemExit, match="was trained on .*pictures; the FID here compares with Fashion-MNIST"):
        main(["evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--num", "2", "--device", "cpu"])  # the shape fits, the data does not


def test_cli_refuses_what_a_folder_cannot_give(tmp_path, tiny_recipe):
    write_test_pattern_folder(tmp_path / "pictures", 2)
    with pytest.raises(SystemExit, match="give --image-size"):
        cli_train(tmp_path, "--data", str(tmp_path / "pictures"))
    with pytest.raises(SystemExit, match="--num-classes needs labels"):
        cli_train(tmp_path, "--data", str(tmp_path / "pictures"), "--image-size", "16", "--num-classes", "10")
    with pytest.raises(SystemExit, match="--grey converts a folder's images: cifar10 comes as it is"):
        ddpm_helpers.training_data("cifar10", None, grey=True)
    with pytest.raises(SystemExit, match="neither one of fashion-mnist, mnist, cifar10 nor a folder"):
        cli_train(tmp_path, "--data", str(tmp_path / "nowhere"))
