"""Finding and parsing Fashion-MNIST / MNIST IDX files, and the data loader."""

import gzip
import struct

import numpy as np
import pytest
import torch

import ddpm_helpers
from ddpm_helpers import load_fashion_mnist, load_idx_dataset, load_mnist, make_dataloader, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX layout written by hand (not with ddpm_helpers.write_idx): magic 00 00 08 ndim,
    big-endian uint32 sizes, then the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()


def write_split(folder, split, images, labels, compress=True):
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in zip(stems, (images, labels)):
        payload = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / stem).write_bytes(payload)


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([9, 0, 3, 7, 1], dtype=np.uint8)
    return images, labels


@pytest.fixture
def no_installed_data(tmp_path, monkeypatch):
    """Hide data/ and the Debian package so that only what a test writes can be found."""
    monkeypatch.setattr(ddpm_helpers, "DATA_DIR", tmp_path / "repo-data")
    for name, source in ddpm_helpers.DATASETS.items():
        hidden = source.debian_dir and tmp_path / "debian" / name
        monkeypatch.setitem(ddpm_helpers.DATASETS, name, ddpm_helpers.dataclasses.replace(source, debian_dir=hidden))
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("loader, folder_name", [(load_fashion_mnist, "fashion-mnist"), (load_mnist, "mnist")])
def test_idx_files_load_as_images_in_minus_one_one(tmp_path, tiny, no_installed_data, compress, loader, folder_name):
    images, labels = tiny
    write_split(tmp_path / folder_name, "test", images, labels, compress)
    x, y = loader("test", data_dir=tmp_path, download=False)  # data_dir/<name>/ is searched too
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [9, 0, 3, 7, 1] and y.dtype == torch.int64
    assert x[0, 0, 0, 0] == -1 and x[0, 0, 0, 1] == 1  # 0 -> -1 and 255 -> 1
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 127.5 - 1)


def test_data_dir_from_environment_and_repo_data_folder(tmp_path, tiny, no_installed_data, monkeypatch):
    images, labels = tiny
    write_split(tmp_path / "env", "train", images, labels)
    monkeypatch.setenv("DDPM_DATA_DIR", str(tmp_path / "env"))
    assert len(load_fashion_mnist("train", download=False)[0]) == 5
    monkeypatch.delenv("DDPM_DATA_DIR")
    write_split(ddpm_helpers.DATA_DIR / "fashion-mnist", "train", images[:2], labels[:2])
    assert len(load_fashion_mnist("train", download=False)[0]) == 2


def test_the_explicit_folder_comes_before_data_and_debian(tmp_path, tiny, no_installed_data):
    images, labels = tiny
    write_split(ddpm_helpers.DATASETS["fashion-mnist"].debian_dir, "train", images[:1], labels[:1])
    assert len(load_fashion_mnist("train", download=False)[0]) == 1  # the Debian folder is found
    write_split(ddpm_helpers.DATA_DIR / "fashion-mnist", "train", images[:2], labels[:2])
    assert len(load_fashion_mnist("train", download=False)[0]) == 2  # data/ wins over Debian
    write_split(tmp_path / "mine", "train", images[:3], labels[:3])
    assert len(load_fashion_mnist("train", data_dir=tmp_path / "mine", download=False)[0]) == 3


def test_missing_data_error_names_all_three_ways(no_installed_data):
    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist("train", download=False)
    message = str(error.value)
    assert "download=True" in message and "zalando-datasets/fashion_mnist" in message  # Colab
    assert "apt-get install dataset-fashion-mnist" in message  # Debian
    assert "DDPM_DATA_DIR" in message and "train-images-idx3-ubyte.gz" in message  # by hand
    with pytest.raises(FileNotFoundError, match="no Debian package ships mnist"):
        load_mnist("test", download=False)


def test_unknown_split_or_dataset_is_refused():
    with pytest.raises(ValueError, match="train, test"):
        load_fashion_mnist("validation")
    with pytest.raises(ValueError, match="fashion-mnist, mnist"):
        load_idx_dataset("cifar10")


def test_malformed_idx_files_are_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\0\0\0\0")  # float type code
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match=r"header says shape \(2, 3\)"):
        read_idx(tmp_path / "short")


def test_dataloader_keeps_a_subset_and_drops_the_ragged_batch():
    images, labels = torch.zeros(100, 1, 4, 4), torch.arange(100)
    loader = make_dataloader(images, labels, batch_size=16, subset=40)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (16, 1, 4, 4)
    assert len(set(torch.cat([y for _, y in batches]).tolist())) == 32


def test_dataloader_flips_about_half_of_the_images():
    torch.manual_seed(0)
    images = torch.linspace(-1, 1, 4).expand(512, 1, 4, 4).clone()  # left dark, right bright
    x, _ = next(iter(make_dataloader(images, torch.zeros(512), batch_size=512, flip=True)))
    flipped = (x[:, 0, 0, 0] == 1).float().mean().item()
    assert 0.4 < flipped < 0.6
    x, _ = next(iter(make_dataloader(images, torch.zeros(512), batch_size=512, flip=False)))
    assert (x[:, 0, 0, 0] == -1).all()


def test_dataloader_refuses_images_outside_minus_one_one():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        make_dataloader(torch.rand(8, 1, 4, 4) * 255, torch.zeros(8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        make_dataloader(torch.zeros(8, 4, 4), torch.zeros(8))


def test_a_hugging_face_download_is_cached_as_idx_files(tmp_path, tiny, no_installed_data, monkeypatch):
    """The Colab path: `datasets` hands back PIL images and labels; they are stored as IDX files in
    data/<name>/ and loaded from there, now and next time, without another download."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images, labels = tiny
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: calls.append((hub_id, split)) or table)
    x, y = load_fashion_mnist("test", download=True)
    assert calls == [("zalando-datasets/fashion_mnist", "test")]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 127.5 - 1)
    assert y.tolist() == labels.tolist()
    assert (ddpm_helpers.DATA_DIR / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    x_again, _ = load_fashion_mnist("test", download=True)  # found in data/ now: no second download
    assert len(calls) == 1 and torch.equal(x, x_again)


def test_a_failed_download_explains_the_other_ways(no_installed_data, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(hub_id, split):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"download failed \(no internet\)[\s\S]*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")
