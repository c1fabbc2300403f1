"""Pictures as inputs to a run: image prompts (a CLIP image embedding as a target) and init images
(the dVAE encoder's codes as the starting logits)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from dall_e import map_pixels
from PIL import Image

from engine.models import Models


def to_tensor(image: Image.Image, side: int | None = None) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float in 0..1, centre-cropped to a square and resized to `side`."""
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if side is not None and s != side:
        image = image.resize((side, side), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@torch.no_grad()
def init_logits_from_image(models: Models, image: Image.Image, grid: int) -> torch.Tensor:
    """One-hot logits [1, V, g, g] of the dVAE encoder's codes for `image` (needs models.encoder)."""
    if models.encoder is None:
        raise ValueError("an init image needs the dVAE encoder: configure [worker] encoder / --encoder")
    pixels = to_tensor(image, 8 * grid)[None].to(models.device)  # [1, 3, 8g, 8g]
    codes = models.encoder(map_pixels(pixels)).float().argmax(dim=1)  # [1, g, g]
    return F.one_hot(codes, models.vocab_size).permute(0, 3, 1, 2).float()  # [1, V, g, g]
