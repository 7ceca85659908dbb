"""Training on several processes (torchrun, DistributedDataParallel), tested as 2 CPU processes (gloo).

One start of two processes, each with the environment variables torchrun sets, runs every two-process
part of this file; the tests then read what they left behind. They are forked where the system can
(Linux): a spawned process spends seconds importing torch and its compiler, which the optimizer
loads, before it trains a step.
"""

import contextlib
import dataclasses
import os
import socket
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

import ddpm_helpers
from ddpm_helpers import TrainConfig, UNet, main, read_checkpoint, train

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo")

TINY = dict(
    image_channels=1, image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
    attention_resolutions=[], linear_attention_resolutions=[], dropout=0.0, block_type="resnet", norm_groups=4,
)  # fmt: skip
B = 4  # images per process and step; the one process it is compared with takes 2 B
# grad_clip far above the gradients' norm: clipping would hide their scale, and Adam's moments, compared
# below, are what shows it (Adam's step itself hardly depends on it)
EQUAL_TRAINING = TrainConfig(steps=3, batch_size=B, lr=1e-3, warmup_steps=1, timesteps=50, grad_clip=1e6, sample_every=1000, checkpoint_every=1000)
CLI_STEPS = 4


def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(**TINY)


def script(steps: int = EQUAL_TRAINING.steps, size: int = 2 * B) -> dict:
    """Given images, timesteps and noise for every step of a 2 B batch, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    x0 = ddpm_helpers.uint8_to_model(torch.randint(0, 256, (steps, size, 1, 8, 8), generator=generator))
    t = torch.randint(0, EQUAL_TRAINING.timesteps, (steps, size), generator=generator)
    return dict(x0=x0, t=t, noise=torch.randn(steps, size, 1, 8, 8, generator=generator))


@contextlib.contextmanager
def scripted_batches(part: slice):
    """``train`` draws the images, timesteps and noise of ``part`` of the script's batch at each step,
    in place of random ones."""
    batches = script()
    steps = iter(range(EQUAL_TRAINING.steps))
    step = None

    def batch(self, batch_size):
        nonlocal step
        step = next(steps)
        return batches["x0"][step, part]

    def p_losses(model, schedule, x0, **options):
        return original(model, schedule, x0, t=batches["t"][step, part], noise=batches["noise"][step, part], **options)

    original = ddpm_helpers.p_losses
    with mock.patch.object(ddpm_helpers.TrainingSet, "batch", batch), mock.patch.object(ddpm_helpers, "p_losses", p_losses):
        yield


def train_on_script(part: slice, batch_size: int) -> dict:
    with scripted_batches(part):
        config = dataclasses.replace(EQUAL_TRAINING, batch_size=batch_size)
        return train(tiny_model(), torch.zeros(1, 1, 8, 8), config, device="cpu", progress=False, mixed_precision=False)


CLI_IMAGES = ddpm_helpers.uint8_to_model(torch.randint(0, 256, (64, 1, 28, 28), generator=torch.Generator().manual_seed(0)))


@contextlib.contextmanager
def recorded(folder: Path, name: str):
    """Record every file written (``torch_save_atomically``) and every training batch drawn, in
    ``folder/name_writes.txt`` and ``folder/name_batches.pt``."""
    writes, batches = [], []
    save, draw = ddpm_helpers.torch_save_atomically, ddpm_helpers.TrainingSet.batch

    def recorded_save(obj, path):
        writes.append(Path(path).relative_to(folder).as_posix())
        return save(obj, path)

    def recorded_batch(self, batch_size):
        batches.append(draw(self, batch_size))
        return batches[-1]

    with mock.patch.object(ddpm_helpers, "torch_save_atomically", recorded_save), mock.patch.object(ddpm_helpers.TrainingSet, "batch", recorded_batch):
        try:
            yield
        finally:
            (folder / f"{name}_writes.txt").write_text("".join(f"{path}\n" for path in writes))
            torch.save(batches, folder / f"{name}_batches.pt")


def cli_train(run: Path, *options) -> None:
    """``train --recipe cpu`` through the command line on a tiny model and 64 random 28x28 images."""
    recipe = ({**TINY, "image_size": 28}, ddpm_helpers.CPU_TRAIN_CONFIG)
    with mock.patch.dict(ddpm_helpers.RECIPES, cpu=recipe), mock.patch.object(ddpm_helpers, "load_fashion_mnist", lambda split: (CLI_IMAGES, None)):
        main([
            "train", "--recipe", "cpu", "--steps", str(CLI_STEPS), "--batch-size", "8", "--timesteps", "50", "--out", str(run.parent / "model.pt"),
            "--resume-file", str(run), "--device", "cpu", "--fp32", *options,
        ])  # fmt: skip


def one_of_two_processes(rank: int, folder: Path, port: int) -> None:
    """What each of the two processes runs, started with the environment variables torchrun sets."""
    torch.set_num_threads(1)  # as torchrun does (OMP_NUM_THREADS=1); and a forked process has no thread pool to share
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    result = train_on_script(slice(rank * B, (rank + 1) * B), B)  # train starts the process group
    torch.save({key: result[key] for key in ("model", "optimizer", "losses")}, folder / f"equal_{rank}.pt")
    with recorded(folder, f"rank{rank}"), open(folder / f"rank{rank}_stdout.txt", "w") as out, contextlib.redirect_stdout(out):
        cli_train(folder / "from_two" / "run.pt", "--stop-at", "2")  # a two-process checkpoint, for one process to resume
        cli_train(folder / "from_one" / "run.pt")  # resumes a one-process checkpoint
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(function, *args, timeout_s: float = 300) -> None:
    """``function(rank, *args)`` in two processes; fails if either raises or both have not ended in
    ``timeout_s`` (processes waiting for each other wait for good)."""
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    processes = mp.start_processes(function, args=args, nprocs=2, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout_s
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the two processes had not ended after {timeout_s} s: waiting for each other?")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("distributed")
    (folder / "from_one").mkdir(), (folder / "from_two").mkdir()
    with recorded(folder, "alone"):
        cli_train(folder / "from_one" / "run.pt", "--stop-at", "2")
    run_two_processes(one_of_two_processes, folder, free_port())
    return folder


def test_two_processes_with_batch_b_take_the_steps_of_one_process_with_batch_2b(runs):
    """The same images, timesteps and noise, split between two processes or all in one: the gradients
    are averaged, so every step and the losses recorded agree to float rounding. Adam's first moment
    (a running mean of the gradients) would double if they were summed; the weights would part if the
    processes did not share their gradients, as training on one half alone shows."""
    two = [torch.load(runs / f"equal_{rank}.pt", weights_only=True) for rank in (0, 1)]
    one = train_on_script(slice(0, 2 * B), 2 * B)
    for index, moments in one["optimizer"]["state"].items():
        torch.testing.assert_close(two[0]["optimizer"]["state"][index]["exp_avg"], moments["exp_avg"], rtol=1e-4, atol=1e-7)
    for key, weight in one["model"].items():
        torch.testing.assert_close(two[0]["model"][key], weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(two[1]["model"][key], two[0]["model"][key], rtol=0, atol=0)  # the processes stay in step
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    assert two[1]["losses"] == two[0]["losses"]  # the mean over the processes, in each
    half = train_on_script(slice(0, B), B)
    assert any(not torch.allclose(half["model"][key], weight, rtol=1e-5, atol=1e-5) for key, weight in one["model"].items())


def test_rank_0_alone_writes_checkpoints_exports_and_prints(runs):
    assert (runs / "rank1_writes.txt").read_text() == "" and (runs / "rank1_stdout.txt").read_text() == ""
    assert (runs / "rank0_writes.txt").read_text().split() == ["from_two/run.pt", "from_one/run.pt", "from_one/model.pt"]
    printed = (runs / "rank0_stdout.txt").read_text()
    assert "stopped as planned at step 2 of 4" in printed and "wrote" in printed and "2 processes" in printed


def test_each_process_draws_its_own_batches_and_rank_0_those_of_a_process_alone(runs):
    alone, rank0, rank1 = (torch.load(runs / f"{name}_batches.pt", weights_only=True) for name in ("alone", "rank0", "rank1"))
    assert len(alone) == 2 and len(rank0) == len(rank1) == 2 + 2  # two steps from scratch, then two resumed
    for mine, other in zip(rank0[:2], rank1[:2]):
        assert not torch.equal(mine, other)
    for mine, alone_s in zip(rank0[:2], alone):
        assert torch.equal(mine, alone_s)  # the same seed


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    run = runs / "from_two" / "run.pt"
    stopped = read_checkpoint(run)
    assert stopped["step"] == 2 and "ema" in stopped and not (runs / "from_two" / "model.pt").exists()
    cli_train(run)
    resumed = read_checkpoint(run)
    assert resumed["step"] == CLI_STEPS and resumed["losses"][:2] == stopped["losses"] and len(resumed["losses"]) == CLI_STEPS
    assert [(s["first_step"], s["steps"], "2 processes" in s["hardware"]) for s in resumed["segments"]] == [(0, 2, True), (2, 2, False)]
    assert read_checkpoint(runs / "from_two" / "model.pt")["step"] == CLI_STEPS


def test_a_one_process_checkpoint_resumes_on_two_processes(runs):
    resumed = read_checkpoint(runs / "from_one" / "run.pt")
    assert resumed["step"] == CLI_STEPS and len(resumed["losses"]) == CLI_STEPS
    assert [(s["first_step"], s["steps"], "2 processes" in s["hardware"]) for s in resumed["segments"]] == [(0, 2, False), (2, 2, True)]
    assert "2 processes" in resumed["hardware"]
    assert read_checkpoint(runs / "from_one" / "model.pt")["step"] == CLI_STEPS
