"""Natural photographs that ship inside wheels, cut into deterministic crops: offline image data.

scikit-image bundles a few dozen images under `skimage/data/`, scikit-learn two more
(`load_sample_images`) and foolbox 20 ImageNet validation photographs (`foolbox/data/imagenet_*.jpg`, read
as files: foolbox itself is never imported). The photographs among them (not the synthetic test patterns)
are cropped at several scales and positions, mirrored, and resized, which gives about a thousand distinct
inputs. Crops of one photograph can land in different splits: the test split is never used for a
decision, but its photographs are not all unseen.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Photographs only: microscopy, astronomy and everyday scenes, not skimage's synthetic patterns.
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
                  "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
                  "motorcycle_right.png", "retina.jpg", "rocket.jpg")
# Fractions of the shorter side, and the crops per side at that scale (1 = centred, 2 = corners, 3 = grid).
SCALES = ((1.0, 1), (0.7, 2), (0.45, 3), (0.3, 4))


def _foolbox_photos() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg"))


def describe() -> str:
    foolbox = f", and foolbox's {len(_foolbox_photos())} ImageNet photographs" if _foolbox_photos() else ""
    return f"the photographs bundled in scikit-image and scikit-learn{foolbox}"


def photographs() -> dict[str, Image.Image]:
    import skimage
    from sklearn.datasets import load_sample_images

    folder = Path(skimage.__file__).parent / "data"
    images = {name: Image.open(folder / name).convert("RGB") for name in SKIMAGE_PHOTOS}
    sample = load_sample_images()
    for name, pixels in zip(sample.filenames, sample.images):
        images[Path(name).name] = Image.fromarray(pixels)
    for path in _foolbox_photos():
        with Image.open(path) as image:
            images[path.name] = image.convert("RGB")
    return images


def _boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    boxes = []
    for fraction, per_side in SCALES:
        side = int(min(width, height) * fraction)

        def offsets(length: int) -> list[float]:
            return list(np.linspace(0, length - side, per_side)) if per_side > 1 else [(length - side) / 2]

        boxes += [(int(x), int(y), int(x) + side, int(y) + side) for x in offsets(width) for y in offsets(height)]
    return boxes


def crops(size: int, limit: int, mean: tuple[float, float, float], std: tuple[float, float, float],
          seed: int = 0) -> torch.Tensor:
    """Up to `limit` crops, N x 3 x size x size, normalised as (pixel - mean) / std in 0-255 units.
    Which crops is decided before any is made, so only the ones used are resized."""
    images = photographs()
    specs = [(name, box, flip) for name, image in images.items() for box in _boxes(*image.size)
             for flip in (False, True)]
    random.Random(seed).shuffle(specs)
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    out = []
    for name, box, flip in specs[:limit]:
        crop = images[name].crop(box).resize((size, size), Image.BILINEAR)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append((torch.tensor(np.asarray(crop), dtype=torch.float32).permute(2, 0, 1) - mean_t) / std_t)
    return torch.stack(out)
