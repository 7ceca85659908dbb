"""Image grids and GIFs map [-1, 1] to 0..255 the same way for every image and frame."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_helpers import image_grid, make_gif, model_to_uint8


def test_model_to_uint8_maps_the_range_ends_and_clamps():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0])
    assert model_to_uint8(x).tolist() == [0, 0, 128, 255, 255]


def test_image_grid_shapes_for_grey_and_colour():
    grey = image_grid(torch.zeros(4, 1, 28, 28), nrow=2, padding=2)
    assert grey.shape == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2, 1) and grey.dtype == torch.uint8
    colour = image_grid(torch.zeros(6, 3, 32, 32), nrow=3, padding=0)
    assert colour.shape == (64, 96, 3)


def frames_of(gif):
    picture = Image.open(io.BytesIO(gif.data))
    frames = []
    for index in range(picture.n_frames):
        picture.seek(index)
        frames.append(torch.from_numpy(np.array(picture.convert("L"))))
    return frames


def test_gif_has_one_frame_per_batch_at_the_expected_size():
    frames = [torch.full((4, 1, 8, 8), v) for v in torch.linspace(-1, 1, 7)]
    gif = make_gif(frames, nrow=2, scale=3)
    assert gif.frames == 7 and gif.size == (3 * (2 * 8 + 3 * 2),) * 2
    assert len(frames_of(gif)) == 7


def test_gif_frames_are_not_stretched_per_frame():
    """A nearly flat frame must stay nearly grey, not be min-max stretched to black and white."""
    flat = torch.zeros(1, 1, 8, 8)
    flat[..., :4] = -0.1
    flat[..., 4:] = 0.1
    gif = make_gif([torch.full((1, 1, 8, 8), -1.0), flat], nrow=1, scale=1)
    first, second = frames_of(gif)
    assert first[5, 5] == 0
    assert 110 <= second[5, 3] < second[5, 7] <= 145  # 0.1 -> about 140, -0.1 -> about 115


def test_gif_shows_inline_in_jupyter():
    gif = make_gif([torch.zeros(1, 1, 4, 4)])
    bundle = gif._repr_mimebundle_()
    assert set(bundle) == {"text/html", "text/plain"}
    assert bundle["text/html"].startswith('<img src="data:image/gif;base64,')


def test_gif_needs_frames():
    with pytest.raises(ValueError, match="at least one frame"):
        make_gif([])
