"""The diffusion model the course ships in data/pretrained/: safe to load, small, and it makes clothes."""

import dataclasses

import torch

import ddpm_helpers
from ddpm_helpers import SHIPPED_CHECKPOINT, classifier_outputs, ddim_sample, load_checkpoint, load_classifier


def test_the_shipped_checkpoint_is_small_and_loads_as_plain_tensors():
    assert SHIPPED_CHECKPOINT.stat().st_size <= ddpm_helpers.MAX_SHIPPED_MB * 2**20
    checkpoint = torch.load(SHIPPED_CHECKPOINT, weights_only=True)
    assert "optimizer" not in checkpoint and checkpoint["hardware"] and checkpoint["wall_time_s"] > 0


def test_the_shipped_checkpoint_is_the_cpu_recipe_trained_to_the_end():
    checkpoint = ddpm_helpers.read_checkpoint(SHIPPED_CHECKPOINT)
    model_config, train_config = ddpm_helpers.RECIPES["cpu"]
    assert checkpoint["model_config"] == model_config
    recipe = {k: v for k, v in dataclasses.asdict(train_config).items() if k not in ddpm_helpers.BOOKKEEPING_FIELDS}
    assert {k: checkpoint["train_config"][k] for k in recipe} == recipe
    assert checkpoint["step"] == train_config.steps == len(checkpoint["losses"])


def test_shipped_samples_are_garments_of_many_classes():
    """A sampler fed by an untrained network gives blobs the classifier calls 'shirt' or 'bag'."""
    model, schedule, _ = load_checkpoint(SHIPPED_CHECKPOINT)
    classifier, _ = load_classifier()
    x0 = ddim_sample(model, schedule, (32, 1, 28, 28), steps=20, generator=torch.Generator().manual_seed(0), progress=False)
    probabilities = classifier_outputs(classifier, x0.clamp(-1, 1)).softmax(-1)
    assert probabilities.max(-1).values.mean() > 0.75
    assert len(probabilities.argmax(-1).unique()) >= 7
