"""DDPM from scratch: the code that the course notebooks share.

Each section is built step by step in the notebook named in its heading; the notebook then checks
that its own version gives the same outputs as the one here.

Conventions (Ho et al., 2020, "Denoising Diffusion Probabilistic Models"):

* Images are float tensors of shape ``(B, C, H, W)`` with values in ``[-1, 1]``.
* Notation follows the paper: ``betas`` (beta_t), ``alphas`` (alpha_t = 1 - beta_t) and
  ``alphas_cumprod`` (alpha-bar_t, the product of alpha_1 .. alpha_t).
* Timesteps are **zero-based** in code: ``t`` runs over ``0 .. T-1`` and code ``t`` means the
  paper's ``t + 1``. So ``betas[0]`` is the paper's beta_1, ``alphas_cumprod[T - 1]`` is alpha-bar_T,
  and ``x_t`` in code is the paper's x_{t+1}; the clean image x_0 has no code index.
* ``QUICK`` (environment variable ``DDPM_QUICK=1``) shrinks sizes (data, steps, sample counts)
  so that every notebook runs on a small CPU in minutes. It never changes which code runs.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import gzip
import io
import json
import math
import os
import platform
import random
import re
import struct
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

QUICK = os.environ.get("DDPM_QUICK") == "1"
REPO_URL = "https://github.com/ddpm-from-scratch/ddpm-from-scratch"
DATA_DIR = Path(__file__).resolve().parent / "data"


def by_mode(full, quick):
    """Return ``quick`` in quick mode (``DDPM_QUICK=1``) and ``full`` otherwise."""
    return quick if QUICK else full


# ---------------------------------------------------------------------------------------------
# Reproducibility and hardware
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA); return a CPU generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Run the ``with`` block with ``model`` in eval mode (dropout off, batch norm frozen), then give
    it back in the mode it was in, even if the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def deterministic_float32():
    """A ``with`` block in which a GPU computes float32 as exactly and repeatably as a CPU: cuDNN picks
    deterministic convolution algorithms (some others sum in an order that changes from run to run) and
    no TF32, which Ampere and newer GPUs otherwise use for float32 convolutions (10-bit mantissas).
    Matrix products stay in float32 unless you switch TF32 on for them. The settings come back after
    the block; a CPU does not read them. For notebook checks whose lesson is exactness."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False)


def get_device() -> torch.device:
    """The fastest device available: a CUDA GPU, Apple's MPS, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_hardware(device: torch.device | str | None = None, processes: int = 1) -> str:
    """One line naming the hardware a result was measured on, for notebooks to print. ``processes``: how
    many training processes ran together (torchrun), each on such a GPU or with so many CPU threads."""
    device = torch.device(device or get_device())
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        chip = f"{cpu_model()} CPU, {threads} thread{'s' if threads > 1 else ''}"
    return f"{chip}{f', {processes} processes' if processes > 1 else ''}; PyTorch {torch.__version__}"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and whether it has AVX-512 (speeds differ widely between the course's
    machines), where Linux says; else the processor type Python knows."""
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    text = cpuinfo.read_text()
    names = re.findall(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    avx512 = "with AVX-512" if "avx512f" in text.split() else "without AVX-512"
    return f"{names[0].strip() if names else platform.machine()} ({avx512})"


# ---------------------------------------------------------------------------------------------
# Notebook 01: beta schedules
# ---------------------------------------------------------------------------------------------

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
BETA_START, BETA_END = 1e-4, 0.02  # the paper's linear schedule, for T = 1000
COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal (2021), eq. 17
MAX_BETA = 0.999  # Nichol & Dhariwal clip cosine betas to avoid a singularity at t = T


def beta_schedule(name: str, timesteps: int) -> torch.Tensor:
    """Betas ``(T,)`` in float64 for the named schedule.

    ``linear`` (the paper's) and ``quadratic`` run from 1e-4 to 0.02 at T = 1000, and ``sigmoid``
    ramps between those two values (reaching them only approximately, as sigmoid(+-6) is not 0 or 1).
    For another T both ends are scaled by 1000 / T (Nichol & Dhariwal's rule), so that alpha-bar_T
    stays near zero. ``cosine`` defines alpha-bar directly (Nichol & Dhariwal, eq. 17) and clips
    each beta at 0.999.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
    scale = 1000 / timesteps
    start, end = scale * BETA_START, scale * BETA_END
    if name == "linear":
        betas = torch.linspace(start, end, timesteps, dtype=torch.float64)
    elif name == "quadratic":
        betas = torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2
    elif name == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, timesteps, dtype=torch.float64)) * (end - start) + start
    else:
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA)
    if betas.max() >= 1:
        raise ValueError(
            f"timesteps={timesteps} is too few for the {name} schedule: its largest beta is "
            f"{betas.max():.3f}, and every beta must be below 1 (use more timesteps)"
        )
    return betas


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every per-timestep constant that training and sampling need, computed once.

    All tensors have shape ``(T,)`` and are indexed by the zero-based code ``t``, which is the
    paper's t + 1: entry ``t`` holds the paper's quantity at step t + 1 (``betas[0]`` is beta_1).
    Build one with :meth:`from_name` or :meth:`from_betas`; move it with :meth:`to`. :meth:`at`
    gathers values for a batch of timesteps on the schedule's device, so sampling never copies to
    the CPU.
    """

    # Each comment names the paper's quantity stored at code index t (the paper's step t + 1).
    betas: torch.Tensor  # beta_{t+1}
    alphas: torch.Tensor  # alpha_{t+1} = 1 - beta_{t+1}
    alphas_cumprod: torch.Tensor  # alpha-bar_{t+1} = prod_{s <= t+1} alpha_s
    alphas_cumprod_prev: torch.Tensor  # alpha-bar_t, so alpha-bar_0 = 1 at code t = 0
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas: torch.Tensor  # 1 / sqrt(alpha_{t+1}), in the reverse step (eq. 11)
    sqrt_recip_alphas_cumprod: torch.Tensor  # x_0 = sqrt(1/alpha-bar) x_t - sqrt(1/alpha-bar - 1) eps
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta-tilde_{t+1} (eq. 7); zero at code t = 0 (beta-tilde_1)
    posterior_log_variance_clipped: torch.Tensor  # log beta-tilde_{t+1}, with beta-tilde_1 -> beta-tilde_2
    posterior_mean_coef1: torch.Tensor  # multiplies x_0 in mu-tilde_{t+1} (eq. 7)
    posterior_mean_coef2: torch.Tensor  # multiplies x_{t+1} in mu-tilde_{t+1} (eq. 7)
    # alpha-bar_{t+1} in float64, for snr(). It stays on the CPU (``to`` leaves it there: MPS has no float64).
    alphas_cumprod_float64: torch.Tensor
    name: str = "custom"

    @classmethod
    def from_name(cls, name: str, timesteps: int) -> Schedule:
        return cls.from_betas(beta_schedule(name, timesteps), name=name)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, name: str = "custom") -> Schedule:
        """Precompute in float64 (alpha-bar is a long product), store as float32; keep alpha-bar in
        float64 too, for :meth:`snr`."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        values = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas=alphas.rsqrt(),
            sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        )
        stored = {key: value.float() for key, value in values.items()}
        return cls(**stored, alphas_cumprod_float64=alphas_cumprod, name=name)

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> Schedule:
        kept = ("name", "alphas_cumprod_float64")
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if f.name not in kept}
        return dataclasses.replace(self, **moved)

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) of x_t given x_0, at every code t (paper
        t + 1), in float64 on the CPU: from float32 alpha-bar, 1 - alpha-bar near the first step
        would lose most of its digits."""
        return self.alphas_cumprod_float64 / (1 - self.alphas_cumprod_float64)

    def at(self, name: str, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """The values of ``name`` at a batch of timesteps ``t``, shaped ``(B, 1, ..., 1)`` to
        broadcast against a ``ndim``-dimensional batch of images."""
        return getattr(self, name)[t].view(-1, *([1] * (ndim - 1)))


_CHECKING_VALUES = contextvars.ContextVar("checking_values", default=True)


@contextlib.contextmanager
def values_known_valid():
    """Inside the block, :func:`check_timesteps` and :meth:`UNet.check_inputs` check shapes and types
    but do not read values back to check their range: on a GPU such a read waits for all queued work.
    :func:`train` runs its steps inside it: it draws t in range itself and checks its labels once."""
    token = _CHECKING_VALUES.set(False)
    try:
        yield
    finally:
        _CHECKING_VALUES.reset(token)


def check_timesteps(schedule: Schedule, t: torch.Tensor, batch_size: int) -> None:
    """Raise unless ``t`` is a ``(batch_size,)`` integer tensor with values in ``0 .. T-1`` (the values
    are not read inside :func:`values_known_valid`)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise ValueError(f"t must be a 1-D integer tensor of shape ({batch_size},), got {t!r:.80}")
    if len(t) != batch_size:
        raise ValueError(f"t has {len(t)} timesteps but the batch has {batch_size} images; expected one per image")
    if _CHECKING_VALUES.get() and len(t) and (t.min() < 0 or t.max() >= schedule.timesteps):
        raise ValueError(
            f"t must lie in 0..{schedule.timesteps - 1} (zero-based, T = {schedule.timesteps}); "
            f"got values from {t.min().item()} to {t.max().item()}"
        )


def check_images(x: torch.Tensor, name: str = "x", check_range: bool = False) -> None:
    """Raise unless ``x`` is a float ``(B, C, H, W)`` batch (and, if asked, lies in [-1, 1])."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor of shape (B, C, H, W), got {shape}")
    if check_range and len(x) and (x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} must lie in [-1, 1], got values from {x.min().item():.3f} to {x.max().item():.3f}; "
            "scale images with x * 2 - 1 from [0, 1] or x / 127.5 - 1 from 0..255"
        )


# ---------------------------------------------------------------------------------------------
# Notebook 02: the forward process
# ---------------------------------------------------------------------------------------------


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), paper eq. 4."""
    check_images(x0, "x0")
    check_timesteps(schedule, t, len(x0))
    if noise is None:
        noise = torch.randn_like(x0)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    return schedule.at("sqrt_alphas_cumprod", t) * x0 + schedule.at("sqrt_one_minus_alphas_cumprod", t) * noise


def q_posterior(
    schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0), paper eqs. 6-7.

    The variance, beta-tilde_t, does not depend on the images: it comes back shaped ``(B, 1, 1, 1)``.
    At code ``t = 0`` the mean is x_0 and the variance is 0.
    """
    check_images(x0, "x0")
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t must have the shape of x0 {tuple(x0.shape)}, got {tuple(x_t.shape)}")
    check_timesteps(schedule, t, len(x0))
    mean = schedule.at("posterior_mean_coef1", t) * x0 + schedule.at("posterior_mean_coef2", t) * x_t
    return mean, schedule.at("posterior_variance", t)


def cpu_float64(value) -> torch.Tensor:
    """``value`` (a tensor on any device, or a number) as a float64 tensor on the CPU. Moved first and
    converted second, because Apple's MPS cannot hold float64 tensors."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double()
    return torch.as_tensor(value, dtype=torch.float64)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats, computed in float64
    on the CPU (whatever device the inputs are on) and returned there."""
    mean1, logvar1, mean2, logvar2 = (cpu_float64(v) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + (logvar1.exp() + (mean1 - mean2) ** 2) / logvar2.exp() - 1)


# ---------------------------------------------------------------------------------------------
# Data: Fashion-MNIST, MNIST and CIFAR-10 from IDX files, found locally or downloaded
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    name: str  # folder name under data/ (and under DDPM_DATA_DIR)
    hub_id: str  # Hugging Face dataset backed by parquet files (datasets >= 4 has no scripts)
    debian_package: str | None  # Debian ships Fashion-MNIST but not MNIST
    debian_dir: Path | None
    image_column: str = "image"  # the column of the Hugging Face dataset that holds the images


DATASETS = {
    "fashion-mnist": DatasetSource(
        "fashion-mnist", "zalando-datasets/fashion_mnist", "dataset-fashion-mnist", Path("/usr/share/datasets/fashion-mnist")
    ),
    "mnist": DatasetSource("mnist", "ylecun/mnist", None, None),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these datasets use


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not) of unsigned bytes into a uint8 array of its shape."""
    path = Path(path)
    data = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != IDX_UBYTE:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (expected magic 00 00 08 NDIM)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (the format of the original downloads)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    _write_atomically(Path(path), gzip.compress(header + array.tobytes()))


def _write_atomically(path: Path, payload: bytes) -> None:
    """Write ``PATH.partial``, flush it to the file system (``os.fsync``), then rename it over ``PATH``:
    a crash never leaves a truncated file, and on a mounted Google Drive the whole file has reached
    Drive's client, which uploads it, before it replaces the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)


def torch_save_atomically(obj, path: str | Path) -> Path:
    """``torch.save`` that never leaves a truncated file: write ``PATH.partial``, flush it, then rename it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_atomically(Path(path), buffer.getvalue())
    return Path(path)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _search_dirs(source: DatasetSource, data_dir: str | Path | None) -> list[Path]:
    """Where to look, in order: the explicit folder (or DDPM_DATA_DIR), data/, the Debian package."""
    explicit = data_dir or os.environ.get("DDPM_DATA_DIR")
    dirs = [Path(explicit), Path(explicit) / source.name] if explicit else []
    return dirs + [DATA_DIR / source.name] + ([source.debian_dir] if source.debian_dir else [])


def _download(source: DatasetSource, split: str, target: Path, stems: tuple[str, str]) -> None:
    """Download a split through Hugging Face ``datasets`` and store it as IDX files ``stems`` in ``target``."""
    import datasets  # imported here: only the download path needs it

    table = datasets.load_dataset(source.hub_id, split=split)
    images = np.stack([np.asarray(image, dtype=np.uint8) for image in table[source.image_column]])
    if images.ndim == 4:  # colour: (N, H, W, C) as PIL gives it -> (N, C, H, W) as the model takes it
        images = images.transpose(0, 3, 1, 2)
    labels = np.asarray(table["label"], dtype=np.uint8)
    image_stem, label_stem = stems
    write_idx(target / f"{image_stem}.gz", images)
    write_idx(target / f"{label_stem}.gz", labels)


def _missing_data_error(source: DatasetSource, split: str, searched: list[Path], reason: str, stems: tuple[str, str]) -> FileNotFoundError:
    files = ", ".join(f"{stem}.gz" for stem in stems)
    debian = (
        f"`apt-get install {source.debian_package}` puts the files in {source.debian_dir}"
        if source.debian_package
        else f"no Debian package ships {source.name}; use one of the other two ways"
    )
    return FileNotFoundError(
        f"{source.name} ({split}) not found: {reason}. Searched: {', '.join(map(str, searched))}.\n"
        f"Get it one of three ways:\n"
        f"  1. online (Colab): load with download=True, which fetches {source.hub_id!r} through "
        f"Hugging Face `datasets` and keeps it in data_dir or {DATA_DIR / source.name};\n"
        f"  2. Debian/Ubuntu: {debian};\n"
        f"  3. by hand: put {files} in {DATA_DIR / source.name}, or in a folder named by data_dir= "
        f"or the DDPM_DATA_DIR environment variable."
    )


def _read_split(
    source: DatasetSource, split: str, stems: tuple[str, str], data_dir: str | Path | None, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 arrays of the IDX files ``stems`` (images, labels): found where :func:`_search_dirs`
    looks or, with ``download``, downloaded into ``data_dir`` or ``data/<name>`` first."""
    searched = _search_dirs(source, data_dir)
    folder = next((d for d in searched if all(_find_idx(d, stem) for stem in stems)), None)
    if folder is None:
        if not download:
            raise _missing_data_error(source, split, searched, "no IDX files there and download=False", stems)
        folder = Path(data_dir) if data_dir else DATA_DIR / source.name
        try:
            _download(source, split, folder, stems)
        except Exception as error:  # offline, hub down, `datasets` missing: say how else to get the data
            raise _missing_data_error(source, split, searched, f"download failed ({error})", stems) from error
    return tuple(read_idx(_find_idx(folder, stem)) for stem in stems)


def load_idx_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 in [-1, 1] and labels ``(N,)`` int64 of an IDX dataset.

    Found in this order: ``data_dir`` (or ``DDPM_DATA_DIR``), ``data/<name>``, the Debian package's
    folder, and finally (``download=True``) a Hugging Face ``datasets`` download cached in
    ``data/<name>`` (or ``data_dir``). If none works, the error names all three ways to get the data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in IDX_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(IDX_FILES)}")
    images, labels = _read_split(DATASETS[name], split, IDX_FILES[split], data_dir, download)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{name}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
    return uint8_to_model(torch.from_numpy(images.copy()).unsqueeze(1)), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(split="train", data_dir=None, download=True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST: see :func:`load_idx_dataset`. Class names are in ``FASHION_MNIST_CLASSES``."""
    return load_idx_dataset("fashion-mnist", split, data_dir, download)


def load_mnist(split="train", data_dir=None, download=True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST: see :func:`load_idx_dataset`."""
    return load_idx_dataset("mnist", split, data_dir, download)


CIFAR10 = DatasetSource("cifar10", "uoft-cs/cifar10", None, None, image_column="img")
CIFAR10_FILES = {  # IDX files like Fashion-MNIST's, the images 4-D (N, 3, 32, 32): read_idx and write_idx take any shape
    "train": ("cifar10-train-images-idx4-ubyte", "cifar10-train-labels-idx1-ubyte"),
    "test": ("cifar10-test-images-idx4-ubyte", "cifar10-test-labels-idx1-ubyte"),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10(split="train", data_dir=None, download=True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10: images ``(N, 3, 32, 32)`` float32 in [-1, 1] and labels ``(N,)`` int64 (``CIFAR10_CLASSES``).

    Found like Fashion-MNIST (:func:`load_idx_dataset`) but with no Debian package: ``data_dir`` (or
    ``DDPM_DATA_DIR``), ``data/cifar10``, then a download of ``uoft-cs/cifar10`` cached there as IDX files.
    """
    if split not in CIFAR10_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(CIFAR10_FILES)}")
    images, labels = _read_split(CIFAR10, split, CIFAR10_FILES[split], data_dir, download)
    if images.shape[1:] != (3, 32, 32) or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"cifar10: expected images (N, 3, 32, 32) and labels (N,), got {images.shape} and {labels.shape}")
    return uint8_to_model(torch.from_numpy(images.copy())), torch.from_numpy(labels.astype(np.int64))


class ImageDataset(Dataset):
    """In-memory images and labels, each image flipped left-right with probability 1/2 if asked."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False):
        check_images(images, "images", check_range=True)
        if len(labels) != len(images):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.flip = images, labels, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


QUICK_SUBSET = 2048  # images used in quick mode


def make_dataloader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
    flip: bool = False,
    subset: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> DataLoader:
    """Shuffled batches ``(x, y)`` of in-memory images, dropping the last incomplete batch.

    ``subset`` keeps a random (seeded) subset of that many images; in quick mode it defaults to
    ``QUICK_SUBSET``. ``flip`` adds random horizontal flips, a fair augmentation for clothing.
    """
    generator = torch.Generator().manual_seed(seed)
    subset = subset or by_mode(None, QUICK_SUBSET)
    if subset is not None and subset < len(images):
        keep = torch.randperm(len(images), generator=generator)[:subset]
        images, labels = images[keep], labels[keep]
    dataset = ImageDataset(images, labels, flip=flip)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, generator=generator)


# ---------------------------------------------------------------------------------------------
# Data: a folder of your own images, and a folder of colour emoji to try it on
# ---------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # any case
IMAGE_CHANNELS = {1: "L", 3: "RGB"}  # channels -> Pillow mode; "L" is the luminance 0.299 R + 0.587 G + 0.114 B


def on_white(image):
    """A PIL image as RGB, its transparent parts (emoji backgrounds, logos) made white rather than
    black, the colour that Pillow's plain RGBA -> RGB conversion leaves under them."""
    from PIL import Image

    image = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")


def square_resized(image, size: int):
    """The largest centred square of a PIL image, resized to ``size`` x ``size`` with Lanczos, Pillow's
    sharpest filter; like all of Pillow's filters it averages over every source pixel when it shrinks,
    so a photo reduced tenfold keeps its fine detail as grey levels instead of aliasing."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)


def image_files(folder: Path) -> list[Path]:
    """Every PNG, JPEG and WebP file under ``folder``, subfolders included, in sorted order."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def _no_images_error(folder: Path) -> ValueError:
    suffixes = Counter(path.suffix.lower() or "(no suffix)" for path in folder.rglob("*") if path.is_file())
    found = ", ".join(f"{count} {suffix}" for suffix, count in suffixes.most_common()) or "no files at all"
    return ValueError(f"no images in {folder} or its subfolders: looked for {', '.join(IMAGE_SUFFIXES)} files (any case), found {found}")


def _read_image(path: Path, size: int, mode: str) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)  # phone photos keep their rotation in EXIF
        return np.asarray(square_resized(on_white(upright), size).convert(mode))


def load_image_folder(path: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """Every image under a folder (see :func:`image_files`) as ``(N, channels, size, size)`` float32 in
    [-1, 1]: RGB (``channels=3``) or grey (1), transparency on white, centre-cropped and resized.
    Files Pillow cannot read are skipped with one warning that counts them."""
    folder = Path(path)
    if channels not in IMAGE_CHANNELS:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (the side of the square images), got {size!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images: {'it is a file' if folder.exists() else 'nothing is there'}")
    files = image_files(folder)
    if not files:
        raise _no_images_error(folder)
    pictures, unreadable = [], []
    for file in files:
        try:
            pictures.append(_read_image(file, size, IMAGE_CHANNELS[channels]))
        except OSError:  # not an image after all, truncated, or a format Pillow lacks
            unreadable.append(file.relative_to(folder).as_posix())
    if unreadable:
        names = ", ".join(unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
        warnings.warn(f"skipped {len(unreadable)} of {len(files)} image files in {folder} that Pillow could not read: {names}")
    if not pictures:
        raise ValueError(f"none of the {len(files)} image files in {folder} could be read")
    pixels = np.stack(pictures).reshape(len(pictures), size, size, channels)
    return uint8_to_model(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())


def save_png(image, path: str | Path) -> Path:
    """Write a PIL image as a PNG file, atomically (see :func:`_write_atomically`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _write_atomically(Path(path), buffer.getvalue())
    return Path(path)


EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # Debian's fonts-noto-color-emoji (SIL OFL)
EMOJI_PIXELS = 109  # the size of the font's colour bitmaps, the only size FreeType renders it at
EMOJI_RANGES = (range(0xA9, 0x3400), range(0x1F000, 0x1FB00))  # (c), (R), the symbol blocks, the emoji blocks


def emoji_font(font: str | Path = EMOJI_FONT):
    from PIL import ImageFont

    if not Path(font).is_file():
        raise FileNotFoundError(f"no emoji font at {font}: `apt-get install fonts-noto-color-emoji` puts it there")
    # Pillow's basic layout draws one character at a time, all this needs; raqm fails on some code points
    return ImageFont.truetype(str(font), EMOJI_PIXELS, layout_engine=ImageFont.Layout.BASIC)


def emoji_codepoints(font) -> list[int]:
    """The code points in ``EMOJI_RANGES`` that ``font`` draws: those without a glyph have an empty box."""
    return [code for block in EMOJI_RANGES for code in block if _box_height(font, chr(code)) > 0]


def _box_height(font, text: str) -> int:
    _, top, _, bottom = font.getbbox(text)
    return bottom - top


def render_emoji(font, code: int, size: int):
    """One emoji, drawn in colour at the font's bitmap size, on white, then square and ``size`` x ``size``."""
    from PIL import Image, ImageDraw

    _, _, right, bottom = font.getbbox(chr(code))
    glyph = Image.new("RGBA", (right, bottom))  # transparent
    ImageDraw.Draw(glyph).text((0, 0), chr(code), font=font, embedded_color=True)
    return square_resized(on_white(glyph), size)


def render_emoji_folder(folder: str | Path, size: int = 32, limit: int | None = None, font: str | Path = EMOJI_FONT) -> int:
    """Write ``u<code point>.png`` into ``folder`` for each single-character emoji of the colour font
    (or ``limit`` of them spread evenly over the code points: the first few dozen are grey symbols
    such as (c) and (R)), ``size`` x ``size`` RGB; return how many were written."""
    loaded = emoji_font(font)
    codes = emoji_codepoints(loaded)
    if limit is not None and limit < len(codes):
        codes = [codes[index * len(codes) // limit] for index in range(limit)]
    for code in codes:
        save_png(render_emoji(loaded, code, size), Path(folder) / f"u{code:05x}.png")
    return len(codes)


def write_test_pattern_folder(folder: str | Path, count: int, size: int = 32, seed: int = 0) -> int:
    """Write ``count`` PNGs of a random coloured disc or square on white into ``folder``: a folder of
    RGB images for when the emoji font is absent. Returns ``count``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for index in range(count):
        image = Image.new("RGB", (size, size), "white")
        left, top = rng.randrange(size // 2), rng.randrange(size // 2)
        side = rng.randint(size // 4, size // 2)
        draw = ImageDraw.Draw(image)
        shape = draw.ellipse if index % 2 else draw.rectangle
        shape((left, top, left + side, top + side), fill=tuple(rng.randrange(200) for _ in range(3)))
        save_png(image, Path(folder) / f"pattern{index:04d}.png")
    return count


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image of ``queries`` ``(B, C, H, W)`` the nearest image of ``references`` ``(N, C, H, W)``
    in pixel space (notebook 10's check for copies of training images): ``(distances, indices)``, each
    ``(B,)``. A distance is the root-mean-square difference per pixel and channel, in the images' [-1, 1]
    units (0: the same image; 2: black against white everywhere), computed in float64 (a copy reads as
    0 to within 1e-6) with matrix products, fast enough for 100 samples against CIFAR-10's 50,000 images."""
    check_images(queries, "queries")
    check_images(references, "references")
    if queries.shape[1:] != references.shape[1:] or not len(references):
        raise ValueError(f"queries {tuple(queries.shape)} and references {tuple(references.shape)} must be images of one shape, and references not empty")
    flat = references.flatten(1).double()
    nearest = [torch.cdist(block.flatten(1).double(), flat, compute_mode="use_mm_for_euclid_dist").min(1) for block in queries.split(chunk)]
    distances = torch.cat([found.values for found in nearest]) / math.sqrt(flat.shape[1])
    return distances, torch.cat([found.indices for found in nearest])


# ---------------------------------------------------------------------------------------------
# Display: image grids and animated GIFs
# ---------------------------------------------------------------------------------------------


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """0..255 integers -> floats in [-1, 1]."""
    return images.float() / 127.5 - 1


def model_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> 0..255 integers, clamping first. The same map for every image and frame:
    no per-image min-max stretching, which would hide how the pixel range evolves."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def image_grid(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """A ``(H, W, C)`` uint8 grid of a ``(B, C, H, W)`` batch in [-1, 1], ``nrow`` images a row
    (default: as square as possible). C is 1 for grey images, 3 for colour."""
    from torchvision.utils import make_grid

    check_images(x)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = make_grid(model_to_uint8(x), nrow=nrow, padding=padding, pad_value=255)  # 3 channels
    return grid[:1].permute(1, 2, 0) if x.shape[1] == 1 else grid.permute(1, 2, 0)


def grid_picture(x: torch.Tensor, nrow: int | None = None):
    """The grid of :func:`image_grid` as a PIL image (grey or RGB), for GIF frames and PNG files."""
    from PIL import Image

    grid = image_grid(x, nrow).numpy()
    return Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)


def show_images(x: torch.Tensor, nrow: int | None = None, title: str | None = None, ax=None, scale: float = 0.6):
    """Plot a batch of images in [-1, 1] as one grid with matplotlib; returns the axes."""
    import matplotlib.pyplot as plt

    grid = image_grid(x, nrow)
    if ax is None:
        height, width = grid.shape[:2]
        _, ax = plt.subplots(figsize=(scale * width / 30, scale * height / 30))
    ax.imshow(grid.squeeze(-1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


class Gif:
    """An animated GIF held in memory, shown inline as an HTML ``<img>`` with the GIF embedded.
    (Jupyter, Colab and GitHub all render that; several renderers, nbconvert's among them, do not
    render an ``image/gif`` output.) :meth:`save` writes it to a file."""

    def __init__(self, data: bytes, frames: int, size: tuple[int, int]):
        self.data, self.frames, self.size = data, frames, size

    def save(self, path: str | Path) -> Path:
        _write_atomically(Path(path), self.data)
        return Path(path)

    def __repr__(self) -> str:
        return f"<Gif: {self.frames} frames of {self.size[0]}x{self.size[1]} pixels>"

    def _repr_mimebundle_(self, include=None, exclude=None):
        encoded = base64.b64encode(self.data).decode("ascii")
        return {"text/html": f'<img src="data:image/gif;base64,{encoded}" alt="{self!r}"/>', "text/plain": repr(self)}


def make_gif(frames, nrow: int | None = None, duration_ms: int = 80, hold_last_ms: int = 1500, scale: int = 2) -> Gif:
    """An animated GIF of a sequence of ``(B, C, H, W)`` batches in [-1, 1], each frame a grid.

    Every frame goes through the same clamp-and-map to 0..255 (``model_to_uint8``). The last frame
    is held for ``hold_last_ms``; ``scale`` enlarges pixels for viewing.
    """
    from PIL import Image

    pictures = []
    for frame in frames:
        picture = grid_picture(frame, nrow)
        pictures.append(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST))
    if not pictures:
        raise ValueError("make_gif needs at least one frame")
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return Gif(buffer.getvalue(), frames=len(pictures), size=pictures[0].size)


# ---------------------------------------------------------------------------------------------
# Notebook 03: the U-Net noise predictor
# ---------------------------------------------------------------------------------------------

MAX_PERIOD = 10_000  # longest wavelength / 2 pi of the sinusoidal embedding, as in the Transformer
BLOCK_TYPES = ("resnet", "convnext")
ATTENTION_HEADS, ATTENTION_HEAD_DIM = 4, 32
CONVNEXT_EXPANSION = 4  # width of the ConvNeXt inverted bottleneck, in multiples of its output width


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = MAX_PERIOD) -> torch.Tensor:
    """Embed timesteps ``t`` ``(B,)`` as ``(B, dim)`` sines and cosines (notebook 03, eq. a).

    Entry ``i < dim/2`` is sin(t w_i) and entry ``dim/2 + i`` is cos(t w_i), with frequencies
    w_i = max_period ** (-i / (dim/2)) falling geometrically from 1 to nearly 1 / max_period.
    """
    if dim % 2:
        raise ValueError(f"the embedding dimension must be even (half sines, half cosines), got {dim}")
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = rearrange(t.float(), "b -> b 1") * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Timesteps ``(B,)`` -> ``(B, time_dim)``: a sinusoidal embedding of width ``dim``, then an MLP."""

    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim).to(self.mlp[0].weight.dtype))  # float64 in a float64 model


def scale_and_shift(h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
    """``h * (1 + scale) + shift`` per channel, where ``film`` ``(B, 2C)`` holds scale then shift
    (FiLM, Perez et al. 2018; "adaptive group normalization" in Dhariwal & Nichol 2021)."""
    scale, shift = rearrange(film, "b (two c) -> two b c 1 1", two=2)
    return h * (1 + scale) + shift


class ResidualBlock(nn.Module):
    """Two rounds of conv 3x3 -> GroupNorm -> SiLU; the time embedding scales and shifts every channel
    after the first GroupNorm. A 1x1 conv matches the skip path when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float = 0.0, norm_groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(norm_groups, out_channels)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_channels))
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(scale_and_shift(self.norm1(self.conv1(x)), self.time_proj(time_emb)))
        h = F.silu(self.norm2(self.conv2(self.dropout(h))))
        return h + self.skip(x)


class ConvNextBlock(nn.Module):
    """ConvNeXt-style block (Liu et al. 2022): depthwise 7x7 conv -> GroupNorm with one group (each
    image standardised over all its channels and pixels) -> time scale-and-shift -> inverted bottleneck
    of 1x1 convs (``CONVNEXT_EXPANSION`` times wider, GELU between). A 1x1 conv matches the skip path."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        hidden = CONVNEXT_EXPANSION * out_channels
        self.depthwise = nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels)
        self.norm = nn.GroupNorm(1, in_channels)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * in_channels))
        self.pointwise = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1), nn.GELU(), nn.Dropout(dropout), nn.Conv2d(hidden, out_channels, 1)
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = scale_and_shift(self.norm(self.depthwise(x)), self.time_proj(time_emb))
        return self.pointwise(h) + self.skip(x)


class PixelAttention(nn.Module):
    """What both attention layers share: a pre-norm residual x + out(attend(qkv(norm(x)))), where 1x1
    convs make queries, keys and values for ``heads`` heads of ``head_dim`` features at every pixel.
    Subclasses say how the pixels attend to each other."""

    def __init__(self, channels: int, norm_groups: int = 8, heads: int = ATTENTION_HEADS, head_dim: int = ATTENTION_HEAD_DIM):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.to_qkv = nn.Conv2d(channels, 3 * heads * head_dim, 1, bias=False)
        self.to_out = nn.Conv2d(heads * head_dim, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.to_out(self.attend(self.to_qkv(self.norm(x)), height=x.shape[-2]))

    def attend(self, qkv: torch.Tensor, height: int) -> torch.Tensor:
        raise NotImplementedError


class Attention(PixelAttention):
    """Multi-head self-attention between all H*W pixels. Time and memory grow with (H*W)^2: the
    weights form an (H*W, H*W) matrix per head."""

    def attend(self, qkv: torch.Tensor, height: int) -> torch.Tensor:
        q, k, v = rearrange(qkv, "b (three h d) y x -> three b h (y x) d", three=3, h=self.heads)
        weights = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", weights, v)
        return rearrange(out, "b h (y x) d -> b (h d) y x", y=height)


class LinearAttention(PixelAttention):
    """Linear ("efficient") attention, Shen et al. 2021: softmax q over features and k over pixels,
    then out = q^T (k v^T). Each head summarises all pixels in a (d, d) matrix, so time and memory grow
    linearly with H*W. Same parameters as :class:`Attention`."""

    def attend(self, qkv: torch.Tensor, height: int) -> torch.Tensor:
        q, k, v = rearrange(qkv, "b (three h d) y x -> three b h d (y x)", three=3, h=self.heads)
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)  # (B, heads, d, d)
        out = torch.einsum("bhde,bhdn->bhen", context, q.softmax(dim=-2))
        return rearrange(out, "b h e (y x) -> b (h e) y x", y=height)


class Downsample(nn.Module):
    """Halve H and W: each 2x2 patch becomes one pixel with 4x the channels (nothing is thrown away),
    then a 1x1 conv mixes them back to ``channels``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def unet_resolutions(image_size: int, levels: int) -> list[int]:
    """The side length of the feature maps at each level of a U-Net: image_size, /2, /4, ..."""
    return [image_size // 2**level for level in range(levels)]


def check_unet_config(config: dict) -> None:
    """Raise ValueError, saying what to change, unless ``config`` builds a working :class:`UNet`."""
    if config["block_type"] not in BLOCK_TYPES:
        valid = ", ".join(map(repr, BLOCK_TYPES))
        raise ValueError(f"unknown block_type {config['block_type']!r}; expected one of {valid}")
    for name in ("image_channels", "image_size", "base_channels", "num_res_blocks", "norm_groups"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise ValueError(f"{name} must be a positive int, got {config[name]!r}")
    mults = config["channel_mults"]
    if not mults or not all(isinstance(m, int) and m >= 1 for m in mults):
        raise ValueError(f"channel_mults must be a non-empty list of positive ints, one per level, got {mults!r}")
    if config["base_channels"] % 2:
        raise ValueError(
            f"base_channels must be even (it is also the sinusoidal embedding's width), got {config['base_channels']}"
        )
    if not 0 <= config["dropout"] < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {config['dropout']!r}")
    num_classes = config.get("num_classes")  # absent: unconditional, as in every checkpoint before guidance
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be None (unconditional) or a positive int, got {num_classes!r}")
    size, factor = config["image_size"], 2 ** (len(mults) - 1)
    if size % factor:
        raise ValueError(
            f"image_size={size} is not divisible by 2^{len(mults) - 1} = {factor}, which the {len(mults) - 1} "
            f"downsamplings of {len(mults)} levels (channel_mults={list(mults)}) need; use an image size that "
            f"is a multiple of {factor} or fewer levels"
        )
    resolutions = unet_resolutions(size, len(mults))
    for name in ("attention_resolutions", "linear_attention_resolutions"):
        for resolution in config[name] or []:  # attention_resolutions=None: the lowest resolution
            if resolution not in resolutions:
                raise ValueError(
                    f"{name} contains {resolution}, but a {size}x{size} image with {len(mults)} levels only "
                    f"passes through resolutions {resolutions}; choose from these"
                )
    groups, widths = config["norm_groups"], [config["base_channels"] * m for m in mults]
    for level, width in enumerate(widths):
        if width % groups:
            gcd = math.gcd(*widths)
            divisors = [d for d in range(1, gcd + 1) if gcd % d == 0]
            raise ValueError(
                f"norm_groups={groups} does not divide the width {width} of level {level} "
                f"(base_channels={config['base_channels']} x channel_mults[{level}]={mults[level]}): GroupNorm needs "
                f"the group count to divide every width {widths}; use norm_groups in {divisors} or make "
                f"base_channels a multiple of {groups}"
            )


class UNet(nn.Module):
    """The noise predictor eps_theta(x_t, t) of DDPM: ``(B, C, H, W)`` images and ``(B,)`` integer
    timesteps in, predicted noise of the same shape out. (The sinusoidal embedding is defined for real t
    too: notebook 09's solvers may ask for a timestep between two integers, see :func:`sigma_to_t`.)

    Levels run at ``image_size``, /2, /4, ... with widths ``base_channels * channel_mults[i]``; each level
    has ``num_res_blocks`` blocks (``block_type`` "resnet" or "convnext") on the way down and up, joined by
    skip connections, with self-attention after each block at ``attention_resolutions`` and linear attention
    at ``linear_attention_resolutions``. The middle is block, self-attention, block. ``attention_resolutions=None``
    (the default) means the lowest resolution, ``image_size / 2**(levels - 1)``, so every valid size builds.
    ``model.config`` holds the constructor arguments as a plain dict, with ``None`` replaced by the list it
    stands for, so ``UNet(**model.config)`` rebuilds the architecture.

    The default (``DEFAULT_UNET_CONFIG``) is for 28x28 Fashion-MNIST: base width 64, mults (1, 2, 2) so
    levels run at 28, 14, 7 with 64, 128, 128 channels, two ResNet blocks a level, full attention only at
    7x7 (49 pixels, where it is cheap), dropout 0.1 as in Ho et al. for CIFAR-10: 5.6 M parameters.
    Three levels suffice for 28x28 (7x7 already sees the whole image with a few 3x3 convs); a third
    halving would give 3.5x3.5. See notebook 03 for the measurements behind the choice.

    ``num_classes=K`` makes it eps_theta(x_t, t, c) for classifier-free guidance (Ho & Salimans 2022,
    notebook 08): a learned embedding of the class c, added to the time embedding, with K + 1 rows, where
    row K is the null label (no class), ``model.null_label``. Its rows start as N(0, I) draws, as in
    Dhariwal & Nichol's and diffusers' class embeddings, of a size comparable to the time embedding's:
    a zero start learns the classes far more slowly (Adam moves each weight by about the learning rate
    per step, and the class signal in one batch is weak). Such a model must be called as
    ``model(x, t, labels)`` with ``(B,)`` long labels in 0..K; ask for the unconditional prediction with
    ``torch.full((B,), model.null_label)``. ``num_classes=None`` (the default) is the unconditional network,
    whose ``config`` has no ``num_classes`` key, so that checkpoints written before guidance still compare equal.
    """

    def __init__(
        self,
        image_channels: int = 1,
        image_size: int = 28,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] | list[int] | None = None,
        linear_attention_resolutions: tuple[int, ...] | list[int] = (),
        dropout: float = 0.1,
        block_type: str = "resnet",
        norm_groups: int = 8,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.config = dict(
            image_channels=image_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mults=list(channel_mults),
            num_res_blocks=num_res_blocks,
            attention_resolutions=None if attention_resolutions is None else list(attention_resolutions),
            linear_attention_resolutions=list(linear_attention_resolutions),
            dropout=float(dropout),
            block_type=block_type,
            norm_groups=norm_groups,
        )
        if num_classes is not None:
            self.config["num_classes"] = num_classes
        check_unet_config(self.config)
        widths = [base_channels * m for m in channel_mults]
        resolutions = unet_resolutions(image_size, len(widths))
        if attention_resolutions is None:  # the lowest resolution, where full attention is cheapest
            attention_resolutions = self.config["attention_resolutions"] = resolutions[-1:]
        time_dim = 4 * base_channels

        def block(in_channels: int, out_channels: int) -> nn.Module:
            if block_type == "resnet":
                return ResidualBlock(in_channels, out_channels, time_dim, dropout, norm_groups)
            return ConvNextBlock(in_channels, out_channels, time_dim, dropout)

        def attention(channels: int, resolution: int) -> nn.Module:
            if resolution in attention_resolutions:
                return Attention(channels, norm_groups)
            if resolution in linear_attention_resolutions:
                return LinearAttention(channels, norm_groups)
            return nn.Identity()

        self.time_embedding = TimeEmbedding(base_channels, time_dim)
        self.null_label = num_classes  # the label meaning "no class"; None for an unconditional model
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes + 1, time_dim)
        self.stem = nn.Conv2d(image_channels, base_channels, 3, padding=1)
        self.down, channels = nn.ModuleList(), base_channels
        for level, (width, resolution) in enumerate(zip(widths, resolutions)):
            blocks = [block(channels if i == 0 else width, width) for i in range(num_res_blocks)]
            self.down.append(
                nn.ModuleDict(
                    dict(
                        blocks=nn.ModuleList(blocks),
                        attentions=nn.ModuleList(attention(width, resolution) for _ in blocks),
                        resample=Downsample(width) if level < len(widths) - 1 else nn.Identity(),
                    )
                )
            )
            channels = width
        self.middle = nn.ModuleDict(
            dict(
                block1=block(channels, channels),
                attention=Attention(channels, norm_groups),
                block2=block(channels, channels),
            )
        )
        self.up = nn.ModuleList()
        for level, (width, resolution) in reversed(list(enumerate(zip(widths, resolutions)))):
            # each block takes the concatenation of the path below and one skip of this level's width
            blocks = [block((channels if i == 0 else width) + width, width) for i in range(num_res_blocks)]
            self.up.append(
                nn.ModuleDict(
                    dict(
                        blocks=nn.ModuleList(blocks),
                        attentions=nn.ModuleList(attention(width, resolution) for _ in blocks),
                        resample=Upsample(width) if level > 0 else nn.Identity(),
                    )
                )
            )
            channels = width
        self.head = nn.Sequential(
            nn.GroupNorm(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, image_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, t, labels)
        time_emb = self.time_embedding(t)
        if labels is not None:  # the class c (or null) conditions every block through the time embedding
            time_emb = time_emb + self.class_embedding(labels)
        h, skips = self.stem(x), []
        for level in self.down:
            for block, attention in zip(level["blocks"], level["attentions"]):
                h = attention(block(h, time_emb))
                skips.append(h)
            h = level["resample"](h)
        h = self.middle["block2"](self.middle["attention"](self.middle["block1"](h, time_emb)), time_emb)
        for level in self.up:
            for block, attention in zip(level["blocks"], level["attentions"]):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), time_emb))
            h = level["resample"](h)
        return self.head(h)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Raise unless ``x`` is ``(B, image_channels, image_size, image_size)``, ``t`` is ``(B,)`` and
        ``labels`` is ``(B,)`` long in 0..num_classes for a conditional model and None for an unconditional one
        (the labels' values are not read inside :func:`values_known_valid`)."""
        check_images(x)
        channels, size = self.config["image_channels"], self.config["image_size"]
        if x.shape[1:] != (channels, size, size):
            raise ValueError(
                f"this UNet was built for images of shape ({channels}, {size}, {size}), got {tuple(x.shape[1:])}; "
                "build it with matching image_channels and image_size"
            )
        if not isinstance(t, torch.Tensor) or t.shape != (len(x),):
            raise ValueError(f"t must be a tensor of shape ({len(x)},), one timestep per image, got {t!r:.80}")
        k = self.null_label
        if k is None:
            if labels is not None:
                raise ValueError("this UNet is unconditional (num_classes=None): call it without labels")
            return
        expected = f"a long tensor of shape ({len(x)},) with values in 0..{k} (classes 0..{k - 1}, {k} = null_label)"
        if labels is None:
            raise ValueError(f"this UNet is conditional on {k} classes: labels must be {expected}, got None")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != (len(x),):
            got = f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be {expected}, got {got}")
        if _CHECKING_VALUES.get() and len(labels) and (labels.min() < 0 or labels.max() > k):
            raise ValueError(f"labels must be {expected}, got values from {labels.min().item()} to {labels.max().item()}")


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# For 28x28 Fashion-MNIST; the reasons are in UNet's docstring and notebook 03. Quick mode keeps the
# architecture and shrinks its width and depth so a 2-core CPU can train it in minutes.
DEFAULT_UNET_CONFIG = dict(
    image_channels=1,
    image_size=28,
    base_channels=64,
    channel_mults=[1, 2, 2],
    num_res_blocks=2,
    attention_resolutions=[7],
    linear_attention_resolutions=[],
    dropout=0.1,
    block_type="resnet",
    norm_groups=8,
)
QUICK_UNET_CONFIG = {**DEFAULT_UNET_CONFIG, "base_channels": 16, "num_res_blocks": 1}
UNET_CONFIG = by_mode(DEFAULT_UNET_CONFIG, QUICK_UNET_CONFIG)


# ---------------------------------------------------------------------------------------------
# Notebook 04: training (Algorithm 1)
# ---------------------------------------------------------------------------------------------

LOSSES = ("l1", "l2", "mse", "huber")


def p_losses(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    loss_type: str = "l2",
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The simplified objective L_simple (paper eq. 14) for a batch of clean images ``x0``.

    Draws ``t`` uniformly from ``0..T-1`` and ``noise`` ~ N(0, I) unless given, noises ``x0`` with
    :func:`q_sample` and compares the model's noise prediction with the true noise. ``loss_type`` is
    ``l2`` (= ``mse``, the paper's), ``l1`` or ``huber``. ``reduction="none"`` gives one loss per image.
    ``labels`` ``(B,)`` are the classes c of a conditional model, eps_theta(x_t, t, c) (some may be
    the null label: :func:`drop_labels`). ``loss_weights`` ``(T,)``, on the images' device, multiply each
    image's loss by the entry of its timestep, e.g. :func:`min_snr_weights` (None: every timestep weighs
    the same, the paper's choice).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss {loss_type!r}; expected one of {', '.join(LOSSES)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if t is None:
        t = torch.randint(0, schedule.timesteps, (len(x0),), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, t, noise)
    predicted = model(x_t, t) if labels is None else model(x_t, t, labels)
    if loss_type == "l1":
        loss = F.l1_loss(predicted, noise, reduction="none")
    elif loss_type == "huber":
        loss = F.smooth_l1_loss(predicted, noise, reduction="none")
    else:
        loss = F.mse_loss(predicted, noise, reduction="none")
    per_image = loss.flatten(1).mean(1)
    if loss_weights is not None:
        per_image = per_image * loss_weights[t].to(per_image.dtype)
    return per_image.mean() if reduction == "mean" else per_image


def min_snr_weights(schedule: Schedule, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for eps-prediction (Hang et al. 2023), min(SNR(t), gamma) / SNR(t), at
    every code t (float64 on the CPU, from :meth:`Schedule.snr`). They are 1 where the image is mostly
    noise (SNR <= gamma) and fall as gamma / SNR(t) at small t, where predicting the noise is hardest
    to get exactly right and matters least for the picture."""
    snr = schedule.snr()
    return snr.clamp(max=gamma) / snr


LR_DECAYS = ("none", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The course's training recipe. ``TRAIN_CONFIG`` holds the default (quick mode: a short run)."""

    steps: int = 10_000
    batch_size: int = 128  # per process: N processes (torchrun) train on N x batch_size images a step
    lr: float = 2e-4  # Adam, as in the paper
    warmup_steps: int = 500  # linear learning-rate warm-up, as in the paper (which uses 5000)
    ema_decay: float = 0.999  # short runs need a shorter EMA horizon than the paper's 0.9999
    grad_clip: float = 1.0
    loss_type: str = "l2"
    schedule: str = "linear"
    timesteps: int = 1000
    flip: bool = True  # random horizontal flips (paper, for CIFAR-10)
    p_uncond: float = 0.1  # conditional models only: P(label -> null), Ho & Salimans 2022 (0.1-0.2)
    lr_decay: str = "none"  # after the warm-up: "none" (constant, the paper's) or "cosine" (to zero at `steps`)
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) at the n-th update (make_ema)
    zero_init_output: bool = False  # start the U-Net's last convolution at zero, so eps_theta starts at 0
    min_snr_gamma: float | None = None  # weight the loss by min(SNR, gamma) / SNR (min_snr_weights)
    sample_every: int = 2_000
    checkpoint_every: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"unknown learning-rate decay {self.lr_decay!r}; expected one of {', '.join(LR_DECAYS)}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (Hang et al. use 5) or None, got {self.min_snr_gamma}")


TRAIN_CONFIG = by_mode(
    TrainConfig(), TrainConfig(steps=40, batch_size=32, warmup_steps=10, sample_every=40, checkpoint_every=20)
)

# A recipe a 2-core CPU finishes in about 75 minutes: a 0.9 M-parameter U-Net (half the width, one
# block per level), half the batch, half the steps, and the stack that won notebook 04's recipe study:
# a 5x higher peak learning rate with cosine decay, an EMA warm-up and min-SNR-5 loss weighting.
CPU_UNET_CONFIG = {**DEFAULT_UNET_CONFIG, "base_channels": 32, "num_res_blocks": 1}
CPU_TRAIN_CONFIG = TrainConfig(steps=5_000, batch_size=64, lr=1e-3, lr_decay="cosine", ema_warmup=True, min_snr_gamma=5.0)
RECIPES = {"default": (UNET_CONFIG, TRAIN_CONFIG), "cpu": (CPU_UNET_CONFIG, CPU_TRAIN_CONFIG)}

# Fields a resumed run may change: they say how long to train and how often to report, not how
# (`steps` only with a constant learning rate: a decay is planned to end at `steps`).
BOOKKEEPING_FIELDS = ("steps", "sample_every", "checkpoint_every")


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (zero-based) as a fraction of ``config.lr``: a linear
    warm-up over ``warmup_steps``, then constant (``lr_decay="none"``) or a cosine decay that reaches
    zero at ``config.steps`` (``"cosine"``, Loshchilov & Hutter 2017)."""
    warmup = min(1.0, (step + 1) / config.warmup_steps)
    if config.lr_decay == "none":
        return warmup
    progress = min(1.0, max(0, step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return warmup * 0.5 * (1 + math.cos(math.pi * progress))


def warmed_up_ema_decay(decay: float, num_averaged: torch.Tensor) -> torch.Tensor:
    """The EMA decay of the update that follows ``num_averaged`` updates, with a warm-up: min(decay,
    (1 + n) / (10 + n)), as in TensorFlow's ExponentialMovingAverage with ``num_updates``. Early
    updates forget fast, so that the random initial weights do not linger in the average."""
    return ((1 + num_averaged) / (10 + num_averaged)).clamp(max=decay)


class EMA(AveragedModel):
    """An exponential moving average of a model's weights and buffers: ``torch.optim.swa_utils``'s
    ``AveragedModel`` (``ema.module`` holds the average, ``ema.n_averaged`` counts the updates) with an
    update that never reads a value back from the device. The count lives on the model's device, and
    each update lerps every tensor toward the model's by a weight computed there from the count: 1 for
    the first update (a copy), then ``1 - decay`` or, with ``warmup``, ``1 - warmed_up_ema_decay(decay, n)``.
    (PyTorch's multi-tensor lerp takes a weight on the device only as one tensor per tensor averaged:
    on a GPU this is a small kernel per tensor, where a weight read into Python would wait for the GPU.)"""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        super().__init__(model, device=next(model.parameters()).device, use_buffers=True)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        n = self.n_averaged
        decay = warmed_up_ema_decay(self.decay, n) if self.warmup else self.decay
        weight = torch.where(n == 0, 1.0, 1 - decay)
        averaged = [*self.module.parameters(), *self.module.buffers()]
        torch._foreach_lerp_(averaged, [*model.parameters(), *model.buffers()], [weight] * len(averaged))
        self.n_averaged += 1


def make_ema(model: nn.Module, decay: float, warmup: bool = False) -> EMA:
    """An exponential moving average of ``model``'s weights (:class:`EMA`). The first update copies the
    weights; later ones move the average by ``1 - decay`` toward them, or with ``warmup`` by
    ``1 - warmed_up_ema_decay(decay, n)``."""
    return EMA(model, decay, warmup)


def zero_output_layer(model: nn.Module) -> None:
    """Set the U-Net's last convolution to zero: eps_theta(x_t, t) starts at 0 for every input, the
    best constant guess of N(0, I) noise, instead of a random function of x_t (as guided-diffusion does)."""
    nn.init.zeros_(model.head[-1].weight)
    nn.init.zeros_(model.head[-1].bias)


def has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 flags ``avx512_bf16`` or ``amx_bf16`` in
    /proc/cpuinfo). Elsewhere bf16 is emulated and slower than float32."""
    if not cpuinfo.exists():  # not Linux: macOS, Windows
        return False
    flags = set(cpuinfo.read_text().split())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The 16-bit type for mixed precision, or None for plain float32. CUDA: bf16 on GPUs built for
    it (Ampere and newer), else fp16 (``torch.cuda.is_bf16_supported()`` also says yes where bf16 is
    only emulated, slowly, as on Colab's T4). CPU: bf16 where it is native (:func:`has_native_bf16`).
    Elsewhere (Apple MPS, other CPUs): None."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and has_native_bf16():
        return torch.bfloat16
    return None


class TrainingSet:
    """Training images kept on the device as 8-bit integers (all 60,000 Fashion-MNIST images take
    47 MB), with batches and flips drawn there: no DataLoader, no copy from the host at each step.
    A batch is ``batch_size`` images drawn at random with replacement and each flipped left-right
    with probability 1/2 (if ``flip``), from PyTorch's global generator of the device, so the saved
    random state alone says what comes next. In quick mode only ``QUICK_SUBSET`` images are kept.
    Optional ``labels`` ``(N,)`` (long) stay on the device too, and then a batch comes with its labels."""

    def __init__(self, images: torch.Tensor, flip: bool = False, device="cpu", subset: int | None = None, seed: int = 0, labels: torch.Tensor | None = None):
        check_images(images, "images", check_range=True)
        if labels is not None and (labels.dtype != torch.long or labels.shape != (len(images),)):
            raise ValueError(f"labels must be a long tensor of shape ({len(images)},), one per image, got {labels.dtype} of shape {tuple(labels.shape)}")
        subset = subset or by_mode(None, QUICK_SUBSET)
        if subset is not None and subset < len(images):
            keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:subset]
            images, labels = images[keep], None if labels is None else labels[keep]
        self.pixels = model_to_uint8(images).to(device)
        self.labels = None if labels is None else labels.to(device)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, batch_size: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random training images in [-1, 1], on the device; with labels, ``(images, labels)``."""
        index = torch.randint(len(self.pixels), (batch_size,), device=self.pixels.device)
        x0 = uint8_to_model(self.pixels[index])
        if self.flip:
            mirrored = torch.rand(batch_size, 1, 1, 1, device=x0.device) < 0.5
            x0 = torch.where(mirrored, x0.flip(-1), x0)
        return x0 if self.labels is None else (x0, self.labels[index])


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): each label becomes
    ``null_label`` with probability ``p_uncond``, so that one network learns both eps(x_t, t, c) and the
    unconditional eps(x_t, t, null)."""
    return labels.masked_fill(torch.rand(labels.shape, device=labels.device) < p_uncond, null_label)


def cycled_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, .., K-1, 0, 1, .. for ``num`` samples: every class in turn."""
    return torch.arange(num) % num_classes


LOG_EVERY = 50  # steps between reads of the losses from the device (one host sync per read)


def random_state(device: torch.device) -> dict:
    """PyTorch's global random state on the CPU and, for a GPU, on the device: saved in checkpoints,
    so that a resumed run draws exactly the batches, timesteps and noise an uninterrupted one would."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict, device: torch.device, seed: int) -> None:
    """Restore :func:`random_state`'s state for training on ``device``. A state saved on a CPU has no GPU
    generator: on a GPU, every GPU generator is then seeded with ``seed`` (the same each time).

    Exact means: resumed on the device type it was saved on, a run draws exactly the batches, timesteps,
    noise and dropout masks an uninterrupted one would. Across device types it cannot: a GPU draws them
    from its own generator, which a CPU does not have (and a GPU's state is not used on a CPU). There the
    resumed run draws a stream of its own, the same every time that checkpoint resumes. Under torchrun
    the state is rank 0's, and only rank 0 continues it; every other rank draws from :func:`rank_seed`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


# Several processes (`torchrun --nproc_per_node N ddpm_helpers.py train`): DistributedDataParallel. Every
# process holds the whole model and draws batches of its own; their gradients are averaged at each step.

RANK_SEED_STRIDE = 1_000_000  # between the seeds of neighbouring ranks: more steps than a run takes (rank_seed)


def launched_as_one_of_several() -> bool:
    """Whether this process is one of several training together: started by torchrun (which sets
    ``WORLD_SIZE``) or in a process group started already."""
    return process_group_started() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_group_started() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """Whether this is rank 0, the process that keeps the EMA, draws sample grids, writes checkpoints and
    prints; True for a process alone."""
    return not process_group_started() or torch.distributed.get_rank() == 0


def number_of_processes() -> int:
    return torch.distributed.get_world_size() if process_group_started() else 1


def distributed_context(device: torch.device) -> tuple[torch.device, int, int]:
    """``(device, rank, world_size)`` of this training process. Alone, ``(device, 0, 1)``, and nothing
    starts. One of several (:func:`launched_as_one_of_several`), it joins the process group unless it is
    in it already (backend ``nccl`` on GPUs, ``gloo`` on CPUs; the address from torchrun's environment
    variables), and on a GPU it takes GPU ``LOCAL_RANK``, one GPU a process."""
    if not launched_as_one_of_several():
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not process_group_started():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s random stream when it starts training at ``step``: ``seed + step +
    rank * RANK_SEED_STRIDE``. Rank 0 starts a run from ``seed`` and resumes from the random state in
    the checkpoint (rank 0's); every other rank starts and resumes from this seed, a stream of its own
    that is the same every time a checkpoint resumes, on any number of processes."""
    return seed + step + rank * RANK_SEED_STRIDE


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the training processes (one all-reduce); ``x`` itself for a process alone."""
    if number_of_processes() == 1:
        return x
    total = x.clone()
    torch.distributed.all_reduce(total)
    return total / number_of_processes()


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true in any training process (one all-reduce, read back to the host), so that
    all processes act on a decision that one clock made; ``flag`` itself for a process alone."""
    if number_of_processes() == 1:
        return flag
    flags = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags.item())


def wait_for_all_processes() -> None:
    """A barrier: no process goes on before every one has come here (nothing to wait for alone)."""
    if number_of_processes() > 1:
        torch.distributed.barrier()


def check_finite_losses(losses: list[float], first_step: int, config: TrainConfig) -> None:
    """Stop training at the first non-finite loss, with what to try."""
    for step, loss in enumerate(losses, start=first_step):
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss} at step {step}: training stopped. Lower the learning rate "
                f"(now {config.lr}) or the gradient clip (now {config.grad_clip}), and check the data is finite."
            )


def train(
    model: nn.Module,
    images: torch.Tensor,
    config: TrainConfig = TRAIN_CONFIG,
    checkpoint_path: str | Path | None = None,
    on_sample=None,
    num_samples: int = 16,
    device: torch.device | str | None = None,
    progress: bool = True,
    mixed_precision: bool = True,
    labels: torch.Tensor | None = None,
    stop_at: int | None = None,
    stop_after_s: float | None = None,
) -> dict:
    """Algorithm 1: repeat { x_0 ~ data; t ~ U{0..T-1}; eps ~ N(0, I); step on ||eps - eps_theta||^2 }.

    ``images`` is the training set, ``(N, C, H, W)`` in [-1, 1]; it moves to the device once
    (:class:`TrainingSet`). Adds what a real run needs: Adam with learning-rate warm-up (and, if the
    config asks, a cosine decay: :func:`learning_rate_factor`), gradient clipping, an EMA of the
    weights (:func:`make_ema`, with or without warm-up), mixed precision where the hardware has it (:func:`autocast_dtype`;
    ``mixed_precision=False`` keeps float32), a sample grid from the EMA model every ``sample_every``
    steps (passed to ``on_sample(step, images)``), and a checkpoint written atomically every
    ``checkpoint_every`` steps and at the end. If ``checkpoint_path`` exists, training resumes from
    it exactly where it stopped. The losses stay on the device and are read every ``LOG_EVERY`` steps
    (and before a sample grid or checkpoint); a non-finite one stops training with an error, at most
    that many steps late and before anything is saved. No other part of a step reads a value back
    from the device (:func:`values_known_valid`, :class:`EMA`, loss weights built once), so a GPU never
    waits in between. Returns the checkpoint dictionary.

    The config's other recipe options: ``zero_init_output`` zeroes the output layer before the first
    step (:func:`zero_output_layer`; not on a resume), ``min_snr_gamma`` weights the loss (:func:`min_snr_weights`).

    A conditional UNet (``num_classes=K``) trains on ``labels`` ``(N,)`` in 0..K-1, one per image, each
    replaced by the null label with probability ``config.p_uncond`` (:func:`drop_labels`); its sample
    grids show the classes in turn (:func:`cycled_labels`), without guidance.

    A planned stop: ``stop_at`` (a step) or ``stop_after_s`` (seconds of this call), whichever comes
    first, ends the call early with a checkpoint; calling again with the same config resumes. Stopped
    and resumed any number of times, a run gives the uninterrupted run's weights bit for bit on the
    same machine and thread count; on another CPU or a GPU it continues with the same data order,
    learning-rate schedule and random stream, but its floating-point sums may round differently.
    Each call is one segment in the checkpoint's ``segments``: the steps it trained, its time, its hardware.

    Launched by torchrun as N processes (or called in a process group), each process trains the whole
    model in ``DistributedDataParallel`` on a GPU of its own (``LOCAL_RANK``) or on the CPU
    (:func:`distributed_context`), on ``config.batch_size`` images drawn from its own random stream
    (:func:`rank_seed`), so a step sees N x ``batch_size`` images; the gradients are averaged over the
    processes in the backward pass, so every process takes the same optimizer step. The losses recorded
    are the mean of the processes' losses: each the loss of the step's N x ``batch_size`` images. Rank 0 alone keeps the
    EMA, draws the sample grids and writes the checkpoint (the other processes return the dictionary
    without the EMA); when ``train`` returns, in any process, the checkpoint is written. A checkpoint
    resumes on any number of processes: rank 0 continues the saved random state, the others draw from
    :func:`rank_seed`. Give every process the same arguments. With ``stop_after_s`` the processes agree
    at every step whether the time is up (one small all-reduce and host sync a step).
    """
    device, rank, world_size = distributed_context(torch.device(device or get_device()))
    main_process = rank == 0
    if (stop_at is not None or stop_after_s is not None) and checkpoint_path is None:
        raise ValueError("a planned stop (stop_at, stop_after_s) needs a checkpoint_path to resume from")
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be a step in 1..{config.steps}, got {stop_at}")
    k = model.config.get("num_classes")
    if k is None and labels is not None:
        raise ValueError("labels were given, but the UNet is unconditional (num_classes=None)")
    if k is not None and (labels is None or labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"a UNet conditional on {k} classes trains with labels: a (N,) long tensor with values in 0..{k - 1}")
    resuming = checkpoint_path is not None and Path(checkpoint_path).exists()
    if config.zero_init_output and not resuming:
        zero_output_layer(model)
    model.to(device).train()
    schedule = Schedule.from_name(config.schedule, config.timesteps).to(device)
    data = TrainingSet(images, flip=config.flip, device=device, seed=config.seed, labels=labels)
    ema = make_ema(model, config.ema_decay, warmup=config.ema_warmup) if main_process else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    dtype = autocast_dtype(device) if mixed_precision else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # float64 arithmetic on the CPU once, float32 (the loss's dtype) on the device for every step
    loss_weights = None if config.min_snr_gamma is None else min_snr_weights(schedule, config.min_snr_gamma).float().to(device)
    state = {"step": 0, "losses": [], "wall_time_s": 0.0, "segments": []}
    seed_everything(config.seed)
    if resuming:
        state = _resume(checkpoint_path, model, ema, optimizer, warmup, scaler, config, device)
    if rank > 0:  # a random stream of its own
        torch.manual_seed(rank_seed(config.seed, state["step"], rank))
    network = model if world_size == 1 else DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    segment = {"first_step": state["step"], "steps": 0, "wall_time_s": 0.0, "hardware": describe_hardware(device, world_size)}
    state["segments"].append(segment)
    segment_started = time.perf_counter()
    started = segment_started - state["wall_time_s"]
    last = config.steps if stop_at is None else min(stop_at, config.steps)
    unread = torch.zeros(LOG_EVERY, device=device)  # losses not yet read from the device
    bar = tqdm(range(state["step"], last), initial=state["step"], total=config.steps, disable=not progress or not main_process)

    def record_time() -> None:
        now = time.perf_counter()
        state["wall_time_s"] = now - started
        segment.update(steps=state["step"] - segment["first_step"], wall_time_s=now - segment_started)

    def read_losses(count: int) -> None:
        losses = mean_over_processes(unread)[:count].tolist()  # the one host sync
        check_finite_losses(losses, len(state["losses"]), config)
        state["losses"].extend(losses)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")

    for step in bar:
        if labels is None:
            x0, c = data.batch(config.batch_size), None
        else:
            x0, c = data.batch(config.batch_size)
            c = drop_labels(c, config.p_uncond, model.null_label)
        with values_known_valid(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = p_losses(network, schedule, x0, loss_type=config.loss_type, labels=c, loss_weights=loss_weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        warmup.step()
        if main_process:
            ema.update_parameters(model)
        unread[step - len(state["losses"])] = loss.detach()
        state["step"] = step + 1
        stopping = state["step"] == last or (stop_after_s is not None and any_process(time.perf_counter() - segment_started >= stop_after_s, device))
        sample_now = on_sample and state["step"] % config.sample_every == 0
        save_now = checkpoint_path and (state["step"] % config.checkpoint_every == 0 or stopping)
        if sample_now or save_now or state["step"] - len(state["losses"]) == LOG_EVERY or stopping:
            read_losses(state["step"] - len(state["losses"]))
        if sample_now and main_process:
            grid_labels = None if labels is None else cycled_labels(num_samples, k)
            on_sample(state["step"], p_sample_loop(ema.module, schedule, (num_samples, *x0.shape[1:]), progress=False, labels=grid_labels))
        if save_now and main_process:
            record_time()
            save_checkpoint(checkpoint_path, model, ema, config, state, optimizer, warmup, scaler)
        if stopping:
            break
    bar.close()
    record_time()
    wait_for_all_processes()  # until rank 0 has written the checkpoint
    return _checkpoint_dict(model, ema, config, state, optimizer, warmup, scaler)


CHECKPOINT_FORMAT = "ddpm-from-scratch/1"


def _checkpoint_dict(model, ema, config, state, optimizer=None, warmup=None, scaler=None) -> dict:
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model_config": dict(model.config),
        "schedule": {"name": config.schedule, "timesteps": config.timesteps},
        "train_config": dataclasses.asdict(config),
        "step": state["step"],
        "losses": list(state["losses"]),
        "wall_time_s": state["wall_time_s"],
        "segments": [dict(segment) for segment in state.get("segments", [])],
        "hardware": describe_hardware(next(model.parameters()).device, number_of_processes()),
    }
    if ema is not None:  # rank 0 alone keeps the EMA (train)
        checkpoint.update(ema=ema.module.state_dict(), ema_n_averaged=ema.n_averaged)
    checkpoint["model"] = model.state_dict()
    if optimizer is not None:
        checkpoint.update(optimizer=optimizer.state_dict(), warmup=warmup.state_dict(), scaler=scaler.state_dict())
        checkpoint["random_state"] = random_state(next(model.parameters()).device)
    return checkpoint


def save_checkpoint(path, model, ema, config, state, optimizer=None, warmup=None, scaler=None) -> Path:
    """Write a checkpoint atomically: to ``PATH.partial`` first, then renamed over ``PATH``, so a
    crash mid-write never leaves a truncated file. Without ``optimizer`` it holds weights only."""
    return torch_save_atomically(_checkpoint_dict(model, ema, config, state, optimizer, warmup, scaler), path)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dictionary safely (``weights_only=True``: tensors and plain data only).
    Fields added to :class:`TrainConfig` after a checkpoint was written (``p_uncond``, the recipe
    options ``lr_decay`` to ``min_snr_gamma``) read as their defaults, which reproduce the training
    that wrote it, so that it compares equal to today's recipes."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this course (expected format {CHECKPOINT_FORMAT!r})")
    for field in dataclasses.fields(TrainConfig):
        checkpoint["train_config"].setdefault(field.name, field.default)
    return checkpoint


def _config_differences(expected: dict, actual: dict) -> list[str]:
    keys = sorted(set(expected) | set(actual))
    return [f"{key}: checkpoint {expected.get(key)!r}, here {actual.get(key)!r}" for key in keys if expected.get(key) != actual.get(key)]


def _check_same_config(path, kind: str, expected: dict, actual: dict) -> None:
    differences = _config_differences(expected, actual)
    if differences:
        raise ValueError(f"{path} was saved with another {kind} configuration: " + "; ".join(differences))


def _resume(path, model, ema, optimizer, warmup, scaler, config, device) -> dict:
    checkpoint = read_checkpoint(path)
    _check_same_config(path, "model", checkpoint["model_config"], dict(model.config))
    saved = {key: value for key, value in checkpoint["train_config"].items() if key not in BOOKKEEPING_FIELDS}
    here = {key: value for key, value in dataclasses.asdict(config).items() if key not in BOOKKEEPING_FIELDS}
    _check_same_config(path, "training", saved, here)
    planned = checkpoint["train_config"]["steps"]
    if config.lr_decay != "none" and config.steps != planned:
        raise ValueError(
            f"{path} was planned for {planned} steps, and its {config.lr_decay} learning-rate decay reaches zero at "
            f"step {planned}: resuming with steps={config.steps} would change the learning rate of every remaining "
            f"step. Resume with steps={planned}; to stop earlier, use a planned stop (stop_at, or --stop-at)."
        )
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path} holds weights only (no optimizer state), so training cannot resume from it")
    model.load_state_dict(checkpoint["model"])
    if ema is not None:  # rank 0's (train)
        ema.module.load_state_dict(checkpoint["ema"])
        ema.n_averaged.copy_(checkpoint["ema_n_averaged"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    warmup.load_state_dict(checkpoint["warmup"])
    if checkpoint.get("scaler"):  # empty if written with the scaler off (bf16, float32): fp16 then starts a fresh one
        scaler.load_state_dict(checkpoint["scaler"])
    if "random_state" in checkpoint:
        set_random_state(checkpoint["random_state"], device, seed=config.seed + checkpoint["step"])
    else:  # written before checkpoints kept the random state: at least do not repeat the draws done
        seed_everything(config.seed + checkpoint["step"])
    resumed = {key: checkpoint[key] for key in ("step", "losses", "wall_time_s")}
    return {**resumed, "segments": checkpoint.get("segments", [])}  # older checkpoints kept no segments


def conditional_from_unconditional(path: str | Path, num_classes: int) -> UNet:
    """A UNet conditional on ``num_classes`` classes with every weight of the trained unconditional model
    in ``path`` (its EMA weights) and a new, random class embedding: a warm start, cheaper than training
    from scratch. Training must first absorb the class vectors, which shift the time embedding."""
    unconditional, _, checkpoint = load_checkpoint(path)
    if unconditional.null_label is not None:
        raise ValueError(f"{path} holds a conditional model already ({unconditional.null_label} classes)")
    model = UNet(**checkpoint["model_config"], num_classes=num_classes)
    model.load_state_dict({**model.state_dict(), **unconditional.state_dict()})  # all but the class embedding
    return model


def load_checkpoint(path: str | Path, model: nn.Module | None = None, weights: str = "ema", device="cpu"):
    """The trained model (EMA weights unless ``weights="model"``), in eval mode, its schedule, and
    the checkpoint dictionary. A given ``model`` must have the checkpoint's configuration."""
    checkpoint = read_checkpoint(path)
    if model is None:
        model = UNet(**checkpoint["model_config"])
    _check_same_config(path, "model", checkpoint["model_config"], dict(model.config))
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if weights not in checkpoint:
        raise ValueError(f"{path} holds no {weights!r} weights (shipped files keep the EMA weights only when space is short)")
    model.load_state_dict(checkpoint[weights])
    schedule = Schedule.from_name(checkpoint["schedule"]["name"], checkpoint["schedule"]["timesteps"])
    return model.to(device).eval(), schedule.to(device), checkpoint


WORK_DIR_VARIABLE = "DDPM_WORK_DIR"  # where training checkpoints and your exported model go
MODEL_VARIABLE = "DDPM_MODEL"  # a checkpoint for notebooks 05 onwards to use instead of the shipped one
EXPORT_VARIABLE = "DDPM_EXPORT"  # where notebook 04 exports instead (the job that refreshes the shipped model)
GUIDANCE_EXPORT_VARIABLE = "DDPM_CFG_EXPORT"  # where notebook 08 exports instead (the same job)
STUDENT_MODEL_NAME = "my_fashion_mnist_ddpm.pt"
DRIVE_FOLDER = "/content/drive/MyDrive/ddpm-from-scratch"


def in_course(path: str | Path) -> Path:
    """``path`` relative to the course's folder where it lies inside it (for printing), else as is."""
    path = Path(path).resolve()
    return path.relative_to(DATA_DIR.parent) if path.is_relative_to(DATA_DIR.parent) else path


def work_dir() -> Path:
    """Where training writes its resumable checkpoint and the exported model: ``$DDPM_WORK_DIR`` if
    set (:func:`use_google_drive` sets it), else ``data/checkpoints/`` of this clone."""
    return Path(os.environ.get(WORK_DIR_VARIABLE) or DATA_DIR / "checkpoints")


def student_model_path() -> Path:
    """The file notebook 04 exports your trained model to, and notebooks 05 onwards look for first."""
    return work_dir() / STUDENT_MODEL_NAME


def export_target(variable: str = EXPORT_VARIABLE, default: Path | None = None) -> Path:
    """Where a notebook exports the model it trains: the file named by ``$variable`` (``DDPM_EXPORT`` for
    notebook 04, ``DDPM_CFG_EXPORT`` for 08: README's job that refreshes the published results names the
    shipped files), else ``default`` (:func:`student_model_path`). In quick mode a new temporary file,
    whatever the environment says: a quick run's tiny model must never replace a model that later
    notebooks load or that the course ships."""
    if QUICK:
        return Path(tempfile.mkdtemp()) / "quick_model.pt"
    return Path(os.environ.get(variable) or default or student_model_path())


def use_google_drive() -> Path:
    """On Colab: mount Google Drive and keep checkpoints and exports in a Drive folder, so that a
    disconnect loses nothing and later notebooks (each its own Colab runtime) find your model.

    Every checkpoint and export is flushed to Drive's client as it is written (:func:`torch_save_atomically`),
    which uploads it in the background. The one call Colab documents that waits until Drive holds every
    write, ``drive.flush_and_unmount()``, also unmounts the folder: run it when you end a session."""
    from google.colab import drive  # only on Colab

    drive.mount("/content/drive")
    Path(DRIVE_FOLDER).mkdir(parents=True, exist_ok=True)
    os.environ[WORK_DIR_VARIABLE] = DRIVE_FOLDER
    print(f"checkpoints and your exported model go to {DRIVE_FOLDER}")
    print("before you end the session: from google.colab import drive; drive.flush_and_unmount()")
    return Path(DRIVE_FOLDER)


def choose_model_file() -> tuple[Path, str]:
    """The checkpoint notebooks 05 onwards sample from, and why: the model you exported in notebook
    04 if there is one, else the file named by ``$DDPM_MODEL``, else the one the course ships."""
    if student_model_path().exists():
        return student_model_path(), "your model, exported by notebook 04"
    if os.environ.get(MODEL_VARIABLE):
        path = Path(os.environ[MODEL_VARIABLE])
        if not path.exists():
            raise FileNotFoundError(f"${MODEL_VARIABLE} names {path}, which does not exist")
        return path, f"the file named by ${MODEL_VARIABLE}"
    return SHIPPED_CHECKPOINT, "shipped with the course; notebook 04 trains and exports your own"


def load_course_model(device=None):
    """:func:`load_checkpoint` of :func:`choose_model_file`'s choice (EMA weights, eval mode), saying
    which file it loaded."""
    path, reason = choose_model_file()
    print(f"model: {in_course(path)} ({reason})")
    return load_checkpoint(path, device=device or get_device())


# ---------------------------------------------------------------------------------------------
# Notebook 05: sampling (Algorithm 2)
# ---------------------------------------------------------------------------------------------

VARIANCES = ("beta", "beta_tilde")


def predict_x0(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert eq. 4 for x_0 given the predicted noise: x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
    return schedule.at("sqrt_recip_alphas_cumprod", t) * x_t - schedule.at("sqrt_recipm1_alphas_cumprod", t) * eps


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise shaped like ``x``, drawn from ``generator`` on its own device, so that a seeded
    CPU generator gives the same noise whatever device the model runs on."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device).to(x.device)


def check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {', '.join(VARIANCES)}")


def reverse_variance(schedule: Schedule, t: torch.Tensor, variance: str = "beta", ndim: int = 4) -> torch.Tensor:
    """sigma_t^2 of p_theta(x_{t-1} | x_t) at a batch of timesteps, shaped like :meth:`Schedule.at`:
    beta_t or beta-tilde_t. At ``t = 0`` the sampler adds no noise, but the decoder L_0 of the
    likelihood bound needs a scale: both choices then give beta-tilde at ``t = 1``, as Ho et al.'s code does."""
    check_variance(variance)
    values = schedule.betas if variance == "beta" else schedule.posterior_variance
    values = torch.cat([schedule.posterior_variance[1:2], values[1:]])
    return values[t].view(-1, *([1] * (ndim - 1)))


def guided_eps(model, x_t, t: torch.Tensor, labels=None, guidance=0.0) -> torch.Tensor:
    """The noise prediction the samplers use. Unconditional (``labels=None``): eps_theta(x_t, t).
    Conditional, classifier-free guidance (Ho & Salimans 2022, eq. 6):

        eps~ = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, null)

    with classes ``labels`` ``(B,)`` and ``guidance`` w in Ho & Salimans' convention: w = 0 is the plain
    conditional model (one forward pass of the batch), w > 0 pushes each sample towards its class and
    away from the others. diffusers and Imagen write the same as eps_null + s (eps_c - eps_null) with
    ``guidance_scale`` s = 1 + w. For w != 0 both predictions come from ONE forward pass of the doubled
    batch: images [x_t, x_t] with labels [c, null] (``model.null_label``)."""
    if labels is None:
        if guidance:
            raise ValueError(f"guidance={guidance} needs labels: guidance steers a conditional model towards classes")
        return model(x_t, t)
    if model.null_label is None:
        raise ValueError("labels need a conditional model (a UNet built with num_classes); this one is unconditional")
    labels = labels.to(x_t.device)
    if guidance == 0:
        return model(x_t, t, labels)
    null = torch.full_like(labels, model.null_label)
    eps_c, eps_null = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
    return (1 + guidance) * eps_c - guidance * eps_null


def p_mean_variance(
    model, schedule, x_t, t: torch.Tensor, variance="beta", clip_x0=False, labels=None, guidance=0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of p_theta(x_{t-1} | x_t) for a batch with timesteps ``t`` ``(B,)``.

    The mean is eq. 11 computed from the predicted noise or, with ``clip_x0``, the posterior mean
    (eq. 7) at the predicted x_0 clipped to [-1, 1]; the variance is :func:`reverse_variance`. A
    conditional model takes ``labels`` and ``guidance`` (:func:`guided_eps`).
    """
    eps = guided_eps(model, x_t, t, labels, guidance)
    if clip_x0:
        mean, _ = q_posterior(schedule, predict_x0(schedule, x_t, t, eps).clamp(-1, 1), x_t, t)
    else:
        eps_scale = schedule.at("betas", t, x_t.dim()) / schedule.at("sqrt_one_minus_alphas_cumprod", t, x_t.dim())
        mean = schedule.at("sqrt_recip_alphas", t, x_t.dim()) * (x_t - eps_scale * eps)
    return mean, reverse_variance(schedule, t, variance, x_t.dim())


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` count as the same device (an index left out means the current one)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_schedule_device(schedule: Schedule, device: torch.device | str, what: str = "the images") -> None:
    """Refuse a schedule that lives on another device than the sampling, with a message that says the fix."""
    device = torch.device(device)
    if not _same_device(schedule.device, device):
        raise ValueError(f"the schedule is on {schedule.device} but {what} on {device}: call schedule.to({str(device)!r}) first")


def sampling_device(model: nn.Module, schedule: Schedule | None = None, device=None) -> torch.device:
    """The device a sampler runs on: ``device`` if given, else the model's (its first parameter or
    buffer), else, for a model with neither, the schedule's. A model or a schedule elsewhere is refused."""
    model_device = next((tensor.device for tensor in (*model.parameters(), *model.buffers())), None)
    if device is None:
        device = model_device if model_device is not None else (schedule.device if schedule is not None else None)
        if device is None:
            raise ValueError("the model has no parameters or buffers to tell its device: pass device= to the sampler")
    device = torch.device(device)
    if model_device is not None and not _same_device(model_device, device):
        raise ValueError(f"the model is on {model_device} but device={str(device)!r}: call model.to({str(device)!r}) first")
    if schedule is not None:
        check_schedule_device(schedule, device, "the model" if model_device is not None else "the sampling")
    return device


@torch.inference_mode()
def p_sample(model, schedule, x_t, t: int, variance="beta", clip_x0=False, generator=None, labels=None, guidance=0.0) -> torch.Tensor:
    """One reverse step x_t -> x_{t-1} (Algorithm 2, lines 3-4; code ``t`` is zero-based).

    Draws from p_theta(x_{t-1} | x_t) of :func:`p_mean_variance`: its mean plus sigma_t z, where
    sigma_t^2 is ``beta`` (beta_t) or ``beta_tilde`` (beta-tilde_t). At ``t = 0`` the mean is
    returned without noise. ``labels`` and ``guidance``: :func:`guided_eps`.
    """
    check_variance(variance)
    if not 0 <= t < schedule.timesteps:
        raise ValueError(f"t must lie in 0..{schedule.timesteps - 1} (zero-based), got {t}")
    check_schedule_device(schedule, x_t.device, "x_t")
    t_batch = torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)
    mean, sigma_squared = p_mean_variance(model, schedule, x_t, t_batch, variance, clip_x0, labels, guidance)
    if t == 0:
        return mean
    return mean + sigma_squared.sqrt() * _noise_like(x_t, generator)


@torch.inference_mode()
def reverse_chain(model, shape, step, timesteps, x_T=None, generator=None, return_all=False, device=None, progress=True, schedule=None):
    """What every sampler shares: start from x_T ~ N(0, I) (or the given ``x_T``), apply
    ``x = step(x, t)`` for each ``t`` in ``timesteps`` with the model in eval mode, and return the last
    state or, with ``return_all``, all states stacked on the CPU, starting with x_T. The model is
    given back in the mode it was in. The device is :func:`sampling_device`'s."""
    device = sampling_device(model, schedule, device)
    if x_T is None:
        x_T = _noise_like(torch.empty(shape, device=device), generator)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
    x, states = x_T.to(device), [x_T.cpu()]
    with evaluating(model):
        for t in tqdm(timesteps, disable=not progress, desc="sampling"):
            x = step(x, t)
            if return_all:
                states.append(x.cpu())
    return torch.stack(states) if return_all else x


def p_sample_loop(
    model,
    schedule,
    shape,
    variance="beta",
    clip_x0=False,
    generator=None,
    return_all=False,
    x_T=None,
    device=None,
    progress=True,
    labels=None,
    guidance=0.0,
) -> torch.Tensor:
    """Algorithm 2: x_T ~ N(0, I) (or the given ``x_T``), then T reverse steps down to x_0.

    Returns x_0 of ``shape``, or with ``return_all`` all T + 1 states ``(T + 1, *shape)`` on the CPU,
    starting with the pure noise x_T. Sampling runs in eval mode, without building a graph. A
    conditional model draws image i of class ``labels[i]``, with classifier-free ``guidance`` w
    (:func:`guided_eps`)."""
    check_variance(variance)

    def step(x, t):
        return p_sample(model, schedule, x, t, variance, clip_x0, generator, labels, guidance)

    timesteps = range(schedule.timesteps - 1, -1, -1)
    return reverse_chain(model, shape, step, timesteps, x_T, generator, return_all, device, progress, schedule)


# ---------------------------------------------------------------------------------------------
# Notebook 06: DDIM (Song, Meng and Ermon, 2021)
# ---------------------------------------------------------------------------------------------


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The ``steps`` timesteps DDIM visits: evenly spaced, strictly decreasing from ``T - 1`` to 0.
    Each step goes from one to the next, and the step from 0 goes to x_0 (no pair repeats a t)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must lie in 1..{timesteps} (the model's T), got {steps}")
    if steps == 1:
        return [timesteps - 1]
    return torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


@torch.inference_mode()
def ddim_step(model, schedule, x_t, t: int, t_prev: int, eta=0.0, clip_x0=False, generator=None, labels=None, guidance=0.0) -> torch.Tensor:
    """One DDIM update from code timestep ``t`` to ``t_prev`` (``-1`` means x_0), Song et al. eq. 12:
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev). Note ab is the
    cumulative alpha-bar, never the single-step alpha.

    With ``clip_x0``, x0_hat is clipped to [-1, 1] and eps_hat recomputed from it,
    eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t), so that x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_hat
    still holds (as improved-diffusion, denoising-diffusion-pytorch and diffusers with
    ``use_clipped_model_output=True`` do). Without ``clip_x0`` nothing is recomputed. A conditional
    model takes ``labels`` and ``guidance``, and eps_hat is the guided prediction (:func:`guided_eps`)."""
    check_schedule_device(schedule, x_t.device, "x_t")
    t_batch = torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)
    eps = guided_eps(model, x_t, t_batch, labels, guidance)
    x0 = predict_x0(schedule, x_t, t_batch, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - schedule.at("sqrt_alphas_cumprod", t_batch) * x0) / schedule.at("sqrt_one_minus_alphas_cumprod", t_batch)
    alpha_bar = schedule.alphas_cumprod[t]
    alpha_bar_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else alpha_bar.new_ones(())
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
    return x_prev + sigma * _noise_like(x_t, generator) if eta > 0 else x_prev


def ddim_sample(
    model,
    schedule,
    shape,
    steps=50,
    eta=0.0,
    clip_x0=False,
    generator=None,
    return_all=False,
    x_T=None,
    device=None,
    progress=True,
    labels=None,
    guidance=0.0,
) -> torch.Tensor:
    """DDIM sampling with ``steps`` network calls. ``eta=0`` is deterministic given x_T; ``eta=1``
    with all T steps is DDPM with sigma_t^2 = beta-tilde_t. Returns like :func:`p_sample_loop`
    (``return_all`` gives ``steps + 1`` states); ``labels`` and ``guidance`` as there."""
    visited = ddim_timesteps(schedule.timesteps, steps)

    def step(x, pair):
        return ddim_step(model, schedule, x, *pair, eta, clip_x0, generator, labels, guidance)

    pairs = list(zip(visited, visited[1:] + [-1]))  # (t, t_prev); -1 stands for x_0
    return reverse_chain(model, shape, step, pairs, x_T, generator, return_all, device, progress, schedule)


# ---------------------------------------------------------------------------------------------
# Notebook 09: fewer network calls (the probability-flow ODE; Heun, DPM-Solver++)
# ---------------------------------------------------------------------------------------------
#
# The solvers work in the variables of DDIM's section 4.3 and of Karras et al. (2022):
# y = x / sqrt(alpha-bar) and sigma = sqrt((1 - alpha-bar) / alpha-bar), so that y = x_0 + sigma eps.
# In them the probability-flow ODE of DDPM is dy/dsigma = eps_theta(y / sqrt(1 + sigma^2), t(sigma))
# (DDIM eq. 14), and D(y; sigma) = y - sigma eps_theta is the predicted x_0. Each solver visits a
# decreasing list of levels (t, sigma) from sigma_{T-1} to sigma_0, then takes one last step to
# sigma = 0, where y is x_0. DPM-Solver's lambda (half the log-SNR) is -log sigma.

SPACINGS = ("time", "logSNR", "karras")
SIGMA_TO_T = ("nearest", "interpolate")
KARRAS_RHO = 7.0  # Karras et al.'s rho: levels uniform in sigma^(1/rho), dense near sigma_min


def schedule_sigmas(schedule: Schedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) = SNR_t^(-1/2) at every code t, increasing with t,
    in float64 on the CPU (from :meth:`Schedule.snr`): the noise level of y = x / sqrt(alpha-bar_t)."""
    return schedule.snr().rsqrt()


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(str, choices))}")


def sigma_to_t(schedule: Schedule, sigmas: torch.Tensor, mode: str = "interpolate") -> torch.Tensor:
    """The model timestep for each noise level in ``sigmas`` (float64, within the schedule's range).

    ``"nearest"``: the code t whose sigma_t is nearest in log sigma, a long tensor. The network then sees
    only timesteps it was trained at, and a solver must step with that sigma_t, not the one it asked for
    (Karras et al. do this for their discrete-time ADM model). ``"interpolate"``: a fractional t, linear
    in log sigma between the two neighbouring levels, float64, as diffusers' schedulers do (Lu et al.'s
    discrete-time wrapper interpolates log sqrt(alpha-bar) instead). The solver keeps its sigma exactly and
    trusts the timestep embedding between integers (it is defined for real t, but the network was trained
    on integers only: notebook 09 measures it)."""
    check_choice("sigma_to_t", mode, SIGMA_TO_T)
    log_sigmas, log_sigma = schedule_sigmas(schedule).log(), cpu_float64(sigmas).log()
    if mode == "nearest":
        return (rearrange(log_sigma, "n -> n 1") - log_sigmas).abs().argmin(dim=1)
    upper = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    lower = upper - 1
    fraction = (log_sigma - log_sigmas[lower]) / (log_sigmas[upper] - log_sigmas[lower])
    return (lower + fraction).clamp(0, len(log_sigmas) - 1)


def solver_sigmas(schedule: Schedule, steps: int, spacing: str = "karras", rho: float = KARRAS_RHO) -> torch.Tensor:
    """``steps`` noise levels, strictly decreasing from sigma_max = sigma_{T-1} to sigma_min = sigma_0,
    float64 on the CPU; a solver takes one step from each, the last one to sigma = 0 (x_0).

    ``"time"``: sigma at DDIM's timesteps (:func:`ddim_timesteps`), uniform in t. ``"logSNR"``: uniform in
    lambda = -log sigma (Lu et al. 2022). ``"karras"``: Karras et al.'s eq. 5,
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho. One step: sigma_max."""
    check_choice("spacing", spacing, SPACINGS)
    if not 1 <= steps <= schedule.timesteps:
        raise ValueError(f"steps must lie in 1..{schedule.timesteps} (the model's T), got {steps}")
    sigmas = schedule_sigmas(schedule)
    if spacing == "time":
        return sigmas[ddim_timesteps(schedule.timesteps, steps)]
    if steps == 1:
        return sigmas[-1:]
    sigma_max, sigma_min = sigmas[-1], sigmas[0]
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)[1:-1]  # the inner levels; both ends are the schedule's own
    if spacing == "logSNR":
        inner = (sigma_max.log() + ramp * (sigma_min.log() - sigma_max.log())).exp()
    else:
        inner = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas[-1:], inner, sigmas[:1]])


def solver_levels(schedule: Schedule, steps: int, spacing: str, sigma_to_t_mode: str = "interpolate") -> list[tuple[int | float, float]]:
    """The (t, sigma) pairs a solver visits, from :func:`solver_sigmas`: an int t where sigma is one of the
    schedule's levels ("time" spacing, or ``"nearest"``, which moves sigma onto the level of its t),
    a float t from :func:`sigma_to_t` otherwise. With ``"nearest"``, levels that round to the same t
    would make a step of length zero: they are refused."""
    sigmas = solver_sigmas(schedule, steps, spacing)
    check_choice("sigma_to_t", sigma_to_t_mode, SIGMA_TO_T)
    if spacing == "time":
        return list(zip(ddim_timesteps(schedule.timesteps, steps), sigmas.tolist()))
    t = sigma_to_t(schedule, sigmas, sigma_to_t_mode)
    if sigma_to_t_mode == "nearest":
        if (t[1:] == t[:-1]).any():
            raise ValueError(
                f"{steps} {spacing} steps with sigma_to_t='nearest' round two levels to the same timestep; "
                "expected strictly decreasing timesteps: use fewer steps or sigma_to_t='interpolate'"
            )
        sigmas = schedule_sigmas(schedule)[t]
    return list(zip(t.tolist(), sigmas.tolist()))


def denoise(model, y: torch.Tensor, level: tuple[int | float, float], clip_x0=False, labels=None, guidance=0.0) -> torch.Tensor:
    """Karras et al.'s denoiser D(y; sigma) = y - sigma eps_theta(x, t) with x = y / sqrt(1 + sigma^2): the
    predicted x_0 of DDIM eq. 9, written in y. ``level`` is (t, sigma); an int t goes to the model as a
    long tensor, a float t in the images' dtype. ``clip_x0`` clips D to [-1, 1], which in y is DDIM's
    clipped x0_hat with the noise recomputed from it. ``labels``, ``guidance``: :func:`guided_eps`."""
    t, sigma = level
    x = y / math.sqrt(1 + sigma**2)
    t_batch = torch.full((len(y),), t, device=y.device, dtype=torch.long if isinstance(t, int) else y.dtype)
    x0 = y - sigma * guided_eps(model, x, t_batch, labels, guidance)
    return x0.clamp(-1, 1) if clip_x0 else x0


def level_pairs(levels: list) -> list[tuple]:
    """(level, next level) for every step; the next level of the last step is None: sigma = 0, x_0."""
    return list(zip(levels, levels[1:] + [None]))


@torch.inference_mode()
def heun_step(model, x, level, level_next, clip_x0=False, labels=None, guidance=0.0) -> torch.Tensor:
    """One step of Karras et al.'s Algorithm 1 (deterministic, second order) from x at ``level`` (t, sigma)
    to ``level_next``: Euler, y' = y + (sigma_next - sigma) d with the slope d = (y - D(y; sigma)) / sigma,
    then Heun's correction y + (sigma_next - sigma) (d + d') / 2 with the slope d' at (y', sigma_next): two
    network calls. To x_0 (``level_next`` None, sigma_next = 0) the Euler step alone, one call, which
    lands on D(y; sigma) itself: DDIM's last step."""
    sigma = level[1]
    y = x * math.sqrt(1 + sigma**2)
    x0 = denoise(model, y, level, clip_x0, labels, guidance)
    if level_next is None:
        return x0
    sigma_next = level_next[1]
    slope = (y - x0) / sigma
    y_euler = y + (sigma_next - sigma) * slope
    slope_next = (y_euler - denoise(model, y_euler, level_next, clip_x0, labels, guidance)) / sigma_next
    y_next = y + (sigma_next - sigma) * (slope + slope_next) / 2
    return y_next / math.sqrt(1 + sigma_next**2)


def heun_sample(
    model,
    schedule,
    shape,
    steps=10,
    spacing="karras",
    sigma_to_t="interpolate",
    clip_x0=False,
    generator=None,
    return_all=False,
    x_T=None,
    device=None,
    progress=True,
    labels=None,
    guidance=0.0,
) -> torch.Tensor:
    """Karras et al.'s deterministic Heun sampler (their Algorithm 1) on the probability-flow ODE, along
    ``steps`` levels of :func:`solver_levels` (Karras spacing with rho = 7 by default, sigma_max and
    sigma_min the schedule's). Every step but the last makes two network calls, the last one (Euler,
    to x_0) one: ``2 * steps - 1`` calls in all. ``sigma_to_t`` maps a sigma between the schedule's
    levels to a timestep (:func:`sigma_to_t`). Returns like :func:`ddim_sample`: x_0, or with
    ``return_all`` the ``steps + 1`` states from x_T; ``generator`` only draws x_T. ``labels``,
    ``guidance``: :func:`guided_eps`."""

    def step(x, pair):
        return heun_step(model, x, *pair, clip_x0, labels, guidance)

    pairs = level_pairs(solver_levels(schedule, steps, spacing, sigma_to_t))
    return reverse_chain(model, shape, step, pairs, x_T, generator, return_all, device, progress, schedule)


def dpm_solver_update(y, sigma: float, sigma_next: float, x0, previous=None, noise=None):
    """One DPM-Solver++ step (Lu et al. 2022) from y at sigma to sigma_next, given the data prediction
    x0 = D(y; sigma); with h = lambda_next - lambda = log(sigma / sigma_next), e^(-h) = sigma_next / sigma.

    First order (DPM-Solver++1): y_next = e^(-h) y + (1 - e^(-h)) x0, which is DDIM with eta = 0. Second
    order, multistep (2M, their Algorithm 2): ``previous`` = (x0_previous, h_previous) of the step before
    replaces x0 by D = x0 + (x0 - x0_previous) / (2 r) with r = h_previous / h, x0 extrapolated linearly
    in lambda. With ``noise`` (the SDE variant), e^(-h) becomes e^(-2h) and sigma_next sqrt(1 - e^(-2h))
    noise is added; at first order that is DDIM with eta = 1."""
    if previous is not None:
        x0_previous, h_previous = previous
        x0 = x0 + (x0 - x0_previous) * math.log(sigma / sigma_next) / (2 * h_previous)
    ratio = sigma_next / sigma
    if noise is None:
        return ratio * y + (1 - ratio) * x0
    return ratio**2 * y + (1 - ratio**2) * x0 + sigma_next * math.sqrt(1 - ratio**2) * noise


def dpm_solver_sample(
    model,
    schedule,
    shape,
    steps=20,
    order=2,
    spacing="logSNR",
    sigma_to_t="interpolate",
    lower_order_final=False,
    sde=False,
    clip_x0=False,
    generator=None,
    return_all=False,
    x_T=None,
    device=None,
    progress=True,
    labels=None,
    guidance=0.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep) with ``steps`` network calls, one per
    level of :func:`solver_levels` (default uniform in lambda = log-SNR / 2, Lu et al.'s advice for small
    images). ``order=2`` takes the first step and the last one, to x_0 (h is infinite there), at first
    order and every other step at second order; ``order=1`` is DDIM with eta = 0 on the same levels.
    ``lower_order_final`` takes the step before the last one, into sigma_min, at first order too, as Lu
    et al.'s code does for short runs (diffusers: below 15 steps): it matters where that step is much
    longer in lambda than the one before it (levels uniform in t), where eq. 10's extrapolation overshoots.
    ``sde=True`` is DPM-Solver++(2M) SDE, which draws one z from ``generator`` at every step (as
    :func:`ddim_sample` does), so that its first order follows DDIM with eta = 1. Returns like
    :func:`ddim_sample` (``return_all``: ``steps + 1`` states); ``labels``, ``guidance``: :func:`guided_eps`."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (DPM-Solver++ first order, or its 2M multistep), got {order!r}")
    previous = None  # (x0, h) of the step before: the multistep's memory
    levels = solver_levels(schedule, steps, spacing, sigma_to_t)
    first_order_into = [None, levels[-1]] if lower_order_final else [None]  # None: to x_0, where h is infinite

    def step(x, pair):
        nonlocal previous
        level, level_next = pair
        sigma, sigma_next = level[1], (0.0 if level_next is None else level_next[1])
        y = x * math.sqrt(1 + sigma**2)
        x0 = denoise(model, y, level, clip_x0, labels, guidance)
        multistep = previous if order == 2 and level_next not in first_order_into else None
        noise = _noise_like(x, generator) if sde else None
        y_next = dpm_solver_update(y, sigma, sigma_next, x0, multistep, noise)
        if sigma_next > 0:
            previous = (x0, math.log(sigma / sigma_next))
        return y_next / math.sqrt(1 + sigma_next**2)

    return reverse_chain(model, shape, step, level_pairs(levels), x_T, generator, return_all, device, progress, schedule)


# ---------------------------------------------------------------------------------------------
# Notebook 07: measuring sample quality
# ---------------------------------------------------------------------------------------------

CLASSIFIER_CHECKPOINT = DATA_DIR / "pretrained" / "fashion_mnist_classifier.pt"
CLASSIFIER_FORMAT = "ddpm-from-scratch/classifier/1"
CLASSIFIER_CONFIG = dict(channels=[32, 64, 128], feature_dim=128, dropout=0.3)


class FashionClassifier(nn.Module):
    """A small CNN for 28x28 Fashion-MNIST, whose penultimate features stand in for Inception's in FID.

    Each of ``channels`` is a stage conv 3x3 -> BatchNorm -> ReLU -> max-pool 2x2 (28 -> 14 -> 7 -> 3
    pixels), then :meth:`features` flattens and maps to ``feature_dim`` ReLU features, and a linear
    layer gives the 10 class logits. Input: ``(B, 1, 28, 28)`` in [-1, 1]. ``model.config`` holds the
    constructor arguments, as for :class:`UNet`.
    """

    def __init__(self, channels=(32, 64, 128), feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        self.config = dict(channels=list(channels), feature_dim=feature_dim, dropout=float(dropout))
        stages, width, size = [], 1, 28
        for out in channels:
            stages += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            width, size = out, size // 2
        self.body = nn.Sequential(*stages)
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * size * size, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, len(FASHION_MNIST_CLASSES)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, feature_dim)`` penultimate-layer features."""
        check_images(x)
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"the classifier takes Fashion-MNIST images of shape (1, 28, 28), got {tuple(x.shape[1:])}")
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.inference_mode()
def classifier_outputs(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500, features: bool = False) -> torch.Tensor:
    """The classifier's logits (or, with ``features``, its penultimate features) for ``images``, in
    eval mode and in batches on the classifier's device; returned on the CPU in float64."""
    device = next(classifier.parameters()).device
    run = classifier.features if features else classifier
    with evaluating(classifier):
        return torch.cat([cpu_float64(run(batch.to(device))) for batch in images.split(batch_size)])


def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """The fraction of ``images`` whose most likely class is their label."""
    predicted = classifier_outputs(classifier, images, batch_size).argmax(1)
    return (predicted == labels.cpu()).double().mean().item()


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    """How the shipped classifier is trained: Adam with a one-cycle learning rate, no augmentation."""

    epochs: int = 5
    batch_size: int = 128
    max_lr: float = 3e-3
    seed: int = 0


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    config: ClassifierTrainConfig = ClassifierTrainConfig(),
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """Train a :class:`FashionClassifier` (``CLASSIFIER_CONFIG``) with cross-entropy and return the
    dictionary :func:`save_classifier` writes: config, weights, test accuracy, steps, hardware, time.
    In quick mode :func:`make_dataloader` keeps only ``QUICK_SUBSET`` training images."""
    device = torch.device(device or get_device())
    seed_everything(config.seed)
    model = FashionClassifier(**CLASSIFIER_CONFIG).to(device)
    loader = make_dataloader(images, labels, config.batch_size, seed=config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.max_lr)
    steps = config.epochs * len(loader)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.max_lr, total_steps=steps)
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        for x, y in tqdm(loader, disable=not progress, desc=f"epoch {epoch + 1}/{config.epochs}"):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            one_cycle.step()
    return {
        "format": CLASSIFIER_FORMAT,
        "config": dict(model.config),
        "train_config": dataclasses.asdict(config),
        "train_images": len(loader.dataset),
        "steps": steps,
        "test_accuracy": classifier_accuracy(model, test_images, test_labels),
        "wall_time_s": time.perf_counter() - started,
        "hardware": describe_hardware(device),
        "state_dict": {key: value.cpu() for key, value in model.state_dict().items()},
    }


def save_classifier(path: str | Path, checkpoint: dict) -> Path:
    """Write a classifier dictionary from :func:`train_classifier` atomically."""
    return torch_save_atomically(checkpoint, path)


def load_classifier(path: str | Path = CLASSIFIER_CHECKPOINT) -> tuple[FashionClassifier, dict]:
    """The trained classifier, in eval mode, and its dictionary. The file must hold a classifier of
    this course with ``CLASSIFIER_CONFIG``: FIDs are comparable only in the same features. It stays on
    the CPU, wherever the images were drawn: a GPU's convolutions (TF32, cuDNN's choice of algorithm)
    would move its features, and so every FID, a little, and the notebooks' scores would no longer
    equal those of ``evaluate`` for the same images."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path} is not a classifier of this course (expected format {CLASSIFIER_FORMAT!r})")
    _check_same_config(path, "classifier", checkpoint["config"], CLASSIFIER_CONFIG)
    model = FashionClassifier(**CLASSIFIER_CONFIG)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (unbiased, 1/(n-1)) of ``(n, d)`` features, in float64."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"features must have shape (n, d) with n >= 2, got {tuple(features.shape)}")
    features = cpu_float64(features)
    mu = features.mean(0)
    centred = features - mu
    return mu, centred.T @ centred / (len(features) - 1)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix: with eigenvectors V
    and eigenvalues l, V diag(sqrt(l)) V^T. Round-off can make tiny eigenvalues negative: they become 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def trace_sqrt_product(cov1: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """Tr((cov1 cov2)^(1/2)), computed as Tr((S cov2 S)^(1/2)) with S = cov1^(1/2): the two matrices
    are similar, and S cov2 S is symmetric PSD, so its eigenvalues are real and non-negative."""
    root = sqrtm_psd(cov1)
    middle = root @ cov2 @ root
    return torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The Frechet distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau, 1982):
    ||mu1 - mu2||^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1 cov2)^(1/2)). FID is this between features."""
    mu1, cov1, mu2, cov2 = (cpu_float64(v) for v in (mu1, cov1, mu2, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        shapes = ", ".join(str(tuple(v.shape)) for v in (mu1, cov1, mu2, cov2))
        raise ValueError(f"expected means (d,) and covariances (d, d) of one d, got shapes {shapes}")
    distance = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt_product(cov1, cov2)
    return distance.clamp(min=0).item()


def classifier_fid(classifier: nn.Module, images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 500) -> float:
    """FID in the classifier's penultimate features between two batches of images in [-1, 1].
    It depends on the number of images: compare FIDs only at equal n, next to the real-data floor."""
    statistics = [feature_statistics(classifier_outputs(classifier, x, batch_size, features=True)) for x in (images_a, images_b)]
    return frechet_distance(*statistics[0], *statistics[1])


# Bits/dim of the variational bound (Ho et al. section 3.3 and eq. 5; their NLL results are in Table 1).
# The bound on -log p(x_0) is L_T + sum_{t>0} L_t + L_0 in paper indices; in code, term t (zero-based)
# is the paper's L_t for the step x_{t+1} -> x_t, and code t = 0 is the decoder L_0. Every term is in
# bits per dimension: nats averaged over the pixels of an image, divided by ln 2.

PIXEL_BIN = 1 / 255  # half the width of one of the 256 bins of 8-bit data in [-1, 1]


def nats_to_bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Elementwise nats ``(B, ...)`` -> bits per dimension ``(B,)``, one value per image."""
    return nats.flatten(1).mean(1) / math.log(2)


def prior_bpd(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim ``(B,)``, float64 on the CPU; it has no parameters to learn."""
    t = torch.full((len(x0),), schedule.timesteps - 1, device=x0.device, dtype=torch.long)
    mean = schedule.at("sqrt_alphas_cumprod", t) * x0
    log_variance = torch.log1p(-cpu_float64(schedule.at("alphas_cumprod", t)))  # exact even where alpha-bar_T is tiny
    return nats_to_bits_per_dim(normal_kl(mean, log_variance, 0.0, 0.0))


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x_0) elementwise (nats, float64 on the CPU) under the discretised Gaussian decoder (paper eq. 13):
    the mass of N(mean, exp(log_scale)^2) in the bin of width 2/255 around each pixel value of ``x0``,
    with the outermost bins (-1 and 1) extended to -inf and +inf, as in Ho et al.'s code. ``x0`` is
    snapped to the nearest pixel value in float64 (float32 holds them only to about 1e-7), so that
    neighbouring bins share their edges exactly and the 256 probabilities sum to 1."""
    x0, mean, log_scale = (cpu_float64(v) for v in (x0, mean, log_scale))
    x0 = ((x0.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    upper = (x0 - mean + PIXEL_BIN) * torch.exp(-log_scale)  # standardised bin edges
    lower = (x0 - mean - PIXEL_BIN) * torch.exp(-log_scale)
    log_below_upper = torch.special.log_ndtr(upper)  # the bin of -1: P(z < upper)
    log_above_lower = torch.special.log_ndtr(-lower)  # the bin of 1: P(z > lower)
    log_in_bin = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    return torch.where(x0 < -1 + PIXEL_BIN, log_below_upper, torch.where(x0 > 1 - PIXEL_BIN, log_above_lower, log_in_bin))


@torch.inference_mode()
def vb_term_bpd(model, schedule, x0, t: torch.Tensor, variance="beta", clip_x0=False, noise=None) -> torch.Tensor:
    """One term of the bound per image, in bits/dim ``(B,)`` (float64 on the CPU), at x_t ~ q(x_t | x_0) drawn with ``noise``:
    KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) where ``t > 0``, and the decoder's
    -log p_theta(x_0 | x_1) where ``t = 0``. p_theta is the sampler's (:func:`p_mean_variance`)."""
    x_t = q_sample(schedule, x0, t, noise)
    true_mean, _ = q_posterior(schedule, x0, x_t, t)
    model_mean, model_variance = p_mean_variance(model, schedule, x_t, t, variance, clip_x0)
    true_log_variance = schedule.at("posterior_log_variance_clipped", t, x0.dim())
    kl = nats_to_bits_per_dim(normal_kl(true_mean, true_log_variance, model_mean, model_variance.log()))
    decoder = nats_to_bits_per_dim(-discretized_gaussian_log_likelihood(x0, model_mean, model_variance.log() / 2))
    return torch.where(t.cpu() == 0, decoder, kl)


@torch.inference_mode()
def variational_bound_bpd(model, schedule, x0, variance="beta", clip_x0=False, generator=None, progress=True) -> dict:
    """The whole bound on -log p(x_0) in bits/dim for a batch of images in [-1, 1] (Ho et al. eq. 5; NLL in their Table 1):
    ``prior`` L_T ``(B,)``, ``terms`` ``(B, T)`` with column t the code-t term of :func:`vb_term_bpd`
    (column 0 the decoder L_0), and ``total`` ``(B,)``, their sum, all float64 on the CPU. Costs T model calls per batch."""
    check_images(x0, "x0", check_range=True)
    terms = []
    with evaluating(model):
        for step in tqdm(range(schedule.timesteps), disable=not progress, desc="bits/dim"):
            t = torch.full((len(x0),), step, device=x0.device, dtype=torch.long)
            terms.append(vb_term_bpd(model, schedule, x0, t, variance, clip_x0, _noise_like(x0, generator)))
    terms = torch.stack(terms, dim=1)
    prior = prior_bpd(schedule, x0)
    return {"prior": prior, "terms": terms, "total": prior + terms.sum(1)}


# ---------------------------------------------------------------------------------------------
# Command line: python ddpm_helpers.py train | sample | train-classifier | evaluate
# ---------------------------------------------------------------------------------------------

SHIPPED_CHECKPOINT = DATA_DIR / "pretrained" / "fashion_mnist_ddpm.pt"
GUIDANCE_CHECKPOINT = DATA_DIR / "pretrained" / "fashion_mnist_cfg.pt"  # class-conditional, notebook 08
MAX_SHIPPED_MB = 20


def _half_precision(state_dict: dict) -> dict:
    return {key: value.half() if value.is_floating_point() else value for key, value in state_dict.items()}


def _megabytes(state_dict: dict) -> float:
    return sum(value.numel() * value.element_size() for value in state_dict.values()) / 2**20


def export_checkpoint(resumable: str | Path, out: str | Path, **entries) -> Path:
    """What the course ships in ``data/pretrained/``: a training checkpoint without its optimizer
    state, weights stored in float16 (``load_state_dict`` casts them back to float32; sampling
    cannot tell the difference), and the raw weights beside the EMA ones only if the file stays
    within ``MAX_SHIPPED_MB``; ``entries`` (plain data) are added, such as the ``data`` it trained on."""
    checkpoint = {**read_checkpoint(resumable), **entries}
    for key in ("optimizer", "warmup", "scaler", "random_state"):
        checkpoint.pop(key, None)
    checkpoint["ema"], checkpoint["model"] = _half_precision(checkpoint["ema"]), _half_precision(checkpoint["model"])
    if _megabytes(checkpoint["ema"]) + _megabytes(checkpoint["model"]) > MAX_SHIPPED_MB:
        checkpoint.pop("model")
    if _megabytes(checkpoint["ema"]) > MAX_SHIPPED_MB:
        raise ValueError(f"the EMA weights alone take {_megabytes(checkpoint['ema']):.1f} MB, over the {MAX_SHIPPED_MB} MB limit")
    return torch_save_atomically(checkpoint, out)


def _float_or_none(text: str) -> float | None:
    """A command-line number, or None for the word ``none`` (a recipe option switched off)."""
    return None if text.lower() == "none" else float(text)


NAMED_DATA = ("fashion-mnist", "mnist", "cifar10")  # what `train --data` takes besides a folder


def training_data(data: str, image_size: int | None, grey: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images and labels (None for a folder, which has none) that ``train --data`` names; a folder
    in RGB, or in grey with ``grey``."""
    if grey and data in NAMED_DATA:
        raise SystemExit(f"--grey converts a folder's images: {data} comes as it is (Fashion-MNIST and MNIST in grey, CIFAR-10 in RGB)")
    if data == "fashion-mnist":
        images, labels = load_fashion_mnist("train")
    elif data == "mnist":
        images, labels = load_mnist("train")
    elif data == "cifar10":
        images, labels = load_cifar10("train")
    elif not Path(data).is_dir():
        raise SystemExit(f"--data {data} is neither one of {', '.join(NAMED_DATA)} nor a folder")
    elif image_size is None:
        raise SystemExit(f"--data {data} is a folder: give --image-size, the side its images are cropped and resized to (say 32)")
    else:
        return load_image_folder(data, image_size, channels=1 if grey else 3), None
    if image_size not in (None, images.shape[-1]):
        raise SystemExit(f"{data} images are {images.shape[-1]}x{images.shape[-1]}: --image-size resizes a folder's images only")
    return images, labels


def unet_config_for(config: dict, channels: int, size: int) -> dict:
    """``config`` for ``(channels, size, size)`` images, its attention at the same levels as before."""
    levels = len(config["channel_mults"])
    new = dict(zip(unet_resolutions(config["image_size"], levels), unet_resolutions(size, levels)))
    moved = {name: None if config[name] is None else [new[r] for r in config[name]] for name in ("attention_resolutions", "linear_attention_resolutions")}
    return {**config, "image_channels": channels, "image_size": size, **moved}


def _train_command(args) -> None:
    unet_config, recipe = RECIPES[args.recipe]
    config = dataclasses.replace(recipe, **{k: v for k, v in vars(args).items() if k in recipe.__dataclass_fields__})  # the options given
    seed_everything(config.seed)
    images, labels = training_data(args.data, args.image_size, args.grey)
    if labels is None and args.num_classes is not None:
        raise SystemExit(f"--num-classes needs labels, and a folder ({args.data}) has none: train it unconditionally")
    unet_config = unet_config_for(unet_config, images.shape[1], images.shape[-1])  # Fashion-MNIST's: the recipe's as it is
    unet_config = {**unet_config, **({} if args.num_classes is None else {"num_classes": args.num_classes})}
    if args.init_from:
        if args.num_classes is None:
            raise SystemExit("--init-from starts a conditional model from an unconditional one: give --num-classes too")
        if config.zero_init_output:
            raise SystemExit("--zero-init-output would erase the output layer that --init-from brings: give one of them")
        model = conditional_from_unconditional(args.init_from, args.num_classes)
        _check_same_config(args.init_from, "model", unet_config, model.config)
    else:
        model = UNet(**unet_config)
    resumable = Path(args.resume_file or work_dir() / f"{args.recipe}_{Path(args.out).name}")
    stop_after_s = None if args.stop_after is None else 60 * args.stop_after
    joins_group = launched_as_one_of_several() and not process_group_started()  # started by torchrun: train joins the others
    checkpoint = train(
        model, images, config, checkpoint_path=resumable, device=args.device, mixed_precision=not args.fp32,
        labels=None if args.num_classes is None else labels, stop_at=args.stop_at, stop_after_s=stop_after_s,
    )  # fmt: skip
    main_process = is_main_process()
    if joins_group:  # and leaves them: what follows is rank 0's alone
        torch.distributed.destroy_process_group()
    if not main_process:
        return
    if checkpoint["step"] < config.steps:
        print(f"stopped as planned at step {checkpoint['step']} of {config.steps}; {resumable} holds the run: the same command without the stop resumes it")
        return
    data = {"name": args.data if args.data in NAMED_DATA else str(in_course(args.data)), "images": len(images), "channels": images.shape[1], "size": images.shape[-1]}
    # the file says what it trained on and where its weights started (conditional_from_unconditional)
    warm_start = {"init_from": {"file": str(in_course(args.init_from)), "step": read_checkpoint(args.init_from)["step"]}} if args.init_from else {}
    export_checkpoint(resumable, args.out, data=data, **warm_start)
    print(f"trained {checkpoint['step']} steps in {checkpoint['wall_time_s'] / 60:.1f} min on {checkpoint['hardware']}; wrote {args.out}")


SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde", "heun")


def _sampling_labels(args, model, num: int) -> torch.Tensor | None:
    """The classes to draw: none for an unconditional checkpoint (which refuses --label and --guidance);
    for a conditional one, --label for every image, or without it every class in turn."""
    k = model.config.get("num_classes")
    if k is None:
        if args.label is not None or args.guidance is not None:
            raise SystemExit(f"{args.checkpoint} holds an unconditional model: --label and --guidance need one trained with num_classes")
        return None
    if args.label is None:
        return cycled_labels(num, k)
    if not 0 <= args.label <= k:
        raise SystemExit(f"--label must lie in 0..{k} ({k} classes, {k} = the null label) for {args.checkpoint}, got {args.label}")
    return torch.full((num,), args.label)


def _draw_samples(args, model, schedule, num: int, generator: torch.Generator) -> torch.Tensor:
    shape = (num, model.config["image_channels"], model.config["image_size"], model.config["image_size"])
    labels, guidance = _sampling_labels(args, model, num), args.guidance or 0.0
    if args.sampler == "ddpm":
        return p_sample_loop(model, schedule, shape, variance=args.variance, generator=generator, labels=labels, guidance=guidance)
    if args.sampler == "ddim":
        return ddim_sample(model, schedule, shape, steps=args.steps, eta=args.eta, generator=generator, labels=labels, guidance=guidance)
    if args.sampler == "heun":
        return heun_sample(model, schedule, shape, steps=args.steps, generator=generator, labels=labels, guidance=guidance)
    sde = args.sampler == "dpm-solver++-sde"
    return dpm_solver_sample(model, schedule, shape, steps=args.steps, sde=sde, generator=generator, labels=labels, guidance=guidance)


def _sampler_description(args) -> str:
    """The sampler of a command line in words, with its network calls per image."""
    return {
        "ddpm": f"DDPM, variance {args.variance}",
        "ddim": f"DDIM, {args.steps} steps, eta {args.eta}",
        "heun": f"Heun (Karras et al.), {args.steps} steps = {2 * args.steps - 1} network calls, Karras sigmas",
        "dpm-solver++": f"DPM-Solver++(2M), {args.steps} steps, logSNR spacing",
        "dpm-solver++-sde": f"DPM-Solver++(2M) SDE, {args.steps} steps, logSNR spacing",
    }[args.sampler]


def _sample_command(args) -> None:
    if Path(args.out).suffix not in (".pt", ".png"):
        raise SystemExit(f"--out must end in .pt (a uint8 tensor) or .png (an image grid), got {args.out}")
    model, schedule, _ = load_checkpoint(args.checkpoint, weights=args.weights, device=args.device or get_device())
    x0 = _draw_samples(args, model, schedule, args.num, torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    if out.suffix == ".pt":
        torch_save_atomically(model_to_uint8(x0), out)
    else:
        save_png(grid_picture(x0), out)
    print(f"wrote {args.num} samples to {out}")


def _train_classifier_command(args) -> None:
    config = dataclasses.replace(ClassifierTrainConfig(), **({"epochs": args.epochs} if args.epochs else {}))
    checkpoint = train_classifier(*load_fashion_mnist("train"), *load_fashion_mnist("test"), config, device=args.device)
    save_classifier(args.out, checkpoint)
    print(
        f"test accuracy {checkpoint['test_accuracy']:.2%} after {checkpoint['steps']} steps ({config.epochs} epochs of "
        f"{checkpoint['train_images']} images) in {checkpoint['wall_time_s'] / 60:.1f} min on {checkpoint['hardware']}; wrote {args.out}"
    )


def _evaluate_command(args) -> None:
    """FID of ``--num`` samples against as many random test images, next to the real-data floor (those
    test images against as many random training images) and a noise ceiling (clamped N(0, I) images)."""
    classifier, classifier_checkpoint = load_classifier(args.classifier)
    model, schedule, checkpoint = load_checkpoint(args.checkpoint, weights=args.weights, device=args.device or get_device())
    if (model.config["image_channels"], model.config["image_size"]) != (1, 28):
        shape = f"{model.config['image_channels']}x{model.config['image_size']}x{model.config['image_size']}"
        raise SystemExit(f"{args.checkpoint} makes {shape} images; the classifier needs 1x28x28 (Fashion-MNIST)")
    trained_on = checkpoint.get("data", {"name": "fashion-mnist"})["name"]  # files from before train recorded it: Fashion-MNIST
    if trained_on != "fashion-mnist":
        raise SystemExit(f"{args.checkpoint} was trained on {trained_on}; the FID here compares with Fashion-MNIST, in a Fashion-MNIST classifier's features")
    test_images, train_images = load_fashion_mnist("test")[0], load_fashion_mnist("train")[0]
    if not 2 <= args.num <= len(test_images):
        raise SystemExit(f"--num must lie in 2..{len(test_images)} (the test set's size), got {args.num}")
    subsets = torch.Generator().manual_seed(args.seed)
    real = test_images[torch.randperm(len(test_images), generator=subsets)[: args.num]]
    floor = train_images[torch.randperm(len(train_images), generator=subsets)[: args.num]]
    noise = _noise_like(real, subsets).clamp(-1, 1)
    generator, started = torch.Generator().manual_seed(args.seed), time.perf_counter()
    sizes = [len(chunk) for chunk in torch.arange(args.num).split(args.batch_size)]
    batches = [_draw_samples(args, model, schedule, size, generator).cpu() for size in sizes]
    seconds = time.perf_counter() - started
    samples = uint8_to_model(model_to_uint8(torch.cat(batches)))  # scored as saved: clamped and rounded to 8 bits
    sampler = _sampler_description(args)
    if "num_classes" in model.config:
        sampler += f", {'classes in turn' if args.label is None else f'label {args.label}'}, guidance w = {args.guidance or 0.0}"
    print(f"{args.num} samples from {args.checkpoint} ({args.weights} weights; {sampler}) on {describe_hardware(next(model.parameters()).device)}")
    accuracy = classifier_checkpoint["test_accuracy"]
    print(f"FID in the features of {args.classifier} (test accuracy {accuracy:.2%}), n = {args.num}, against {args.num} random test images:")
    scores = dict(fid=classifier_fid(classifier, samples, real), floor=classifier_fid(classifier, floor, real), ceiling=classifier_fid(classifier, noise, real))
    print(f"FID samples: {scores['fid']:.3f}")
    print(f"FID real-data floor: {scores['floor']:.3f}")
    print(f"FID noise ceiling: {scores['ceiling']:.3f}")
    if "num_classes" in model.config:  # the classes asked for, batch by batch as _draw_samples asked for them
        requested = torch.cat([_sampling_labels(args, model, size) for size in sizes])
        agreement = (classifier_outputs(classifier, samples).argmax(1) == requested).double().mean()
        print(f"classifier agrees with the requested class: {agreement:.1%}")
    print(f"time per image: {1000 * seconds / args.num:.1f} ms")
    if args.scores:
        append_scores(args.scores, checkpoint, sampler=sampler, n=args.num, seed=args.seed, weights=args.weights, **scores, ms_per_image=1000 * seconds / args.num, hardware=describe_hardware(next(model.parameters()).device))


LOSS_WINDOW = 1000  # training steps whose mean loss a score line reports


def append_scores(path: str | Path, checkpoint: dict, **scores) -> None:
    """Append one JSON line to ``path``: ``scores`` (what ``evaluate`` measured) after the checkpoint's
    training so far: its step, the mean loss of the last ``LOSS_WINDOW`` steps, its wall time and
    the hardware of each of its segments."""
    losses = checkpoint["losses"][-LOSS_WINDOW:]
    training = dict(
        step=checkpoint["step"], loss=sum(losses) / len(losses), train_wall_time_s=checkpoint["wall_time_s"],
        segments=checkpoint.get("segments", []),
    )  # fmt: skip
    with open(path, "a") as file:
        file.write(json.dumps({**training, **scores}) + "\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python ddpm_helpers.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train one of the course's recipes on Fashion-MNIST or other images (--data)")
    train_parser.add_argument(
        "--data", default="fashion-mnist", metavar="NAME_OR_FOLDER", help=f"one of {', '.join(NAMED_DATA)} (default: "
        "fashion-mnist), or a folder of your own PNG/JPEG/WebP images, trained on in RGB (needs --image-size)"
    )  # fmt: skip
    train_parser.add_argument("--image-size", type=int, metavar="N", help="with a folder: crop its images square and resize them to N x N")
    train_parser.add_argument("--grey", action="store_true", help="with a folder: train on its images in grey (default: RGB)")
    train_parser.add_argument("--recipe", choices=RECIPES, default="default", help="default: for a GPU; cpu: a smaller model")
    train_parser.add_argument("--out", default=str(SHIPPED_CHECKPOINT), help="weights-only checkpoint to write")
    train_parser.add_argument("--resume-file", help="resumable checkpoint (default: data/checkpoints/<recipe>_<out name>)")
    recipe_options = train_parser.add_argument_group(  # an option not given leaves the recipe's value as it is
        "recipe options", "each overrides the TrainConfig field of its name in the chosen recipe", argument_default=argparse.SUPPRESS
    )
    for name in ("steps", "batch_size", "warmup_steps", "sample_every", "checkpoint_every", "seed", "timesteps"):
        recipe_options.add_argument(f"--{name.replace('_', '-')}", type=int)
    for name in ("lr", "ema_decay", "grad_clip", "p_uncond"):
        recipe_options.add_argument(f"--{name.replace('_', '-')}", type=float)
    recipe_options.add_argument("--min-snr-gamma", type=_float_or_none, help="gamma of min-SNR weighting, or none (plain L_simple)")
    recipe_options.add_argument("--lr-decay", choices=LR_DECAYS, help="after the warm-up (none: a constant rate)")
    for name in ("ema_warmup", "zero_init_output"):
        recipe_options.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction)
    recipe_options.add_argument("--loss-type", choices=LOSSES)
    recipe_options.add_argument("--schedule", choices=SCHEDULES)
    train_parser.add_argument("--device", help="cuda, cpu, ... (default: the fastest available)")
    train_parser.add_argument("--fp32", action="store_true", help="no mixed precision (default: bf16/fp16 where the hardware has it)")
    train_parser.add_argument("--num-classes", type=int, help="a class-conditional model for classifier-free guidance (10 for Fashion-MNIST)")
    train_parser.add_argument("--init-from", help="with --num-classes: start from this unconditional checkpoint's EMA weights")
    train_parser.add_argument("--stop-at", type=int, metavar="STEP", help="planned stop: save the resumable checkpoint after this step and exit, without --out")
    train_parser.add_argument("--stop-after", type=float, metavar="MINUTES", help="planned stop after this much wall time (whichever stop comes first)")

    sample_parser = commands.add_parser("sample", help="draw samples from a checkpoint")
    evaluate_parser = commands.add_parser("evaluate", help="FID of a checkpoint's samples, the real-data floor, time per image")
    for sampling_parser, num in ((sample_parser, 16), (evaluate_parser, 1000)):
        sampling_parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
        sampling_parser.add_argument("--num", type=int, default=num)
        sampling_parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="dpm-solver++ and heun: notebook 09")
        sampling_parser.add_argument(
            "--steps", type=int, default=50, help="steps of ddim and dpm-solver++ (one network call each) and of heun (2 x steps - 1 calls)"
        )
        sampling_parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
        sampling_parser.add_argument("--variance", choices=VARIANCES, default="beta", help="DDPM sigma_t^2")
        sampling_parser.add_argument("--seed", type=int, default=0)
        sampling_parser.add_argument("--device")
        sampling_parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="the EMA weights or the raw ones (default: ema)")
        sampling_parser.add_argument(
            "--label", type=int, help="conditional models only: the class N of every image (N = num_classes, the null "
            "label, draws unconditionally); default: the classes in turn, 0, 1, .., K-1, 0, 1, .."
        )  # fmt: skip
        sampling_parser.add_argument(
            "--guidance", type=float, metavar="W", help="conditional models only: classifier-free guidance weight W in "
            "Ho & Salimans' convention, 0 = the plain conditional model (default); diffusers' guidance_scale = 1 + W"
        )  # fmt: skip
    sample_parser.add_argument("--out", required=True, help=".pt: uint8 tensor (N, C, H, W); .png: image grid")
    evaluate_parser.add_argument("--classifier", default=str(CLASSIFIER_CHECKPOINT), help="classifier whose features FID uses")
    evaluate_parser.add_argument("--batch-size", type=int, default=250, help="images sampled at once")
    evaluate_parser.add_argument("--scores", metavar="FILE", help="also append the scores and the checkpoint's training so far to FILE, one JSON line")

    classifier_parser = commands.add_parser("train-classifier", help="train the Fashion-MNIST classifier that FID uses")
    classifier_parser.add_argument("--epochs", type=int, help=f"default {ClassifierTrainConfig.epochs}")
    classifier_parser.add_argument("--out", default=str(CLASSIFIER_CHECKPOINT))
    classifier_parser.add_argument("--device", help="cuda, cpu, ... (default: the fastest available)")

    args = parser.parse_args(argv)
    handlers = dict(train=_train_command, sample=_sample_command, evaluate=_evaluate_command)
    handlers["train-classifier"] = _train_classifier_command
    handlers[args.command](args)


if __name__ == "__main__":
    main()
