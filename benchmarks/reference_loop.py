"""The seed article's loop, written the way its notebook runs it: the baseline of bench_loop.py.

advadnoun's "DALL-E decoder + CLIP" prototype as DESIGN.md rebuilds it from copies of the
notebook: one image (batch 1); logits [1, 8192, g, g] from random one-hot codes; each step
`F.gumbel_softmax` (tau 2) over all 8192 codes (`split_softmax=True`: the notebook's (1, 4096, -1)
reshape), the dVAE decoder, sigmoid on its first 3 channels, `unmap_pixels`; then a Python loop
over the cut-outs, each a random square crop (0.5-0.99 of a side, random offset) resized with
`F.interpolate` and rotated with torchvision's `rotate`, concatenated into one batch, a little noise
(`+ 0.1 * rand * randn`), CLIP's mean/std, one `encode_image` of the cut-outs; loss = minus the mean
cosine similarity to the prompt's embedding; Adam on the logits, lr 0.01 x1.005 a step up to 0.12.

Precision, `notebook` (the default): what the notebook ran on a GPU — CLIP in fp16 (`clip.load` on
CUDA converts the weights) and the decoder's convolutions in fp16 (`dall_e`'s `Conv2d` casts by
itself on CUDA: switched on again in a copy of the engine's decoder, which has them off); on a
CPU both are fp32. `fp32`: everything fp32. The model weights stay frozen in both (the notebook forgot to freeze them
and paid about 50% more compute: `unfrozen=True` reproduces that).

Random numbers come from torch's global generator and Python's `random`, as in the notebook; no
value is read back to the host in a step except when a frame is taken.
"""

from __future__ import annotations

import copy
import random

import clip.model
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from dall_e import unmap_pixels

from engine.attention import stock_attention
from engine.generate import CLIP_MEAN, CLIP_STD, GenerationSettings, Targets
from engine.models import Models


class ReferenceLoop:
    def __init__(
        self, models: Models, targets: Targets, settings: GenerationSettings,
        precision: str = "notebook", unfrozen: bool = False,
    ):
        if precision not in ("notebook", "fp32"):
            raise ValueError("precision must be notebook or fp32")
        self.device = models.device
        self.settings = settings
        cuda = self.device.type == "cuda"
        self.half = cuda and precision == "notebook"
        # A copy of CLIP's image tower (all the loop runs: its encode_image) with
        # nn.MultiheadAttention as the notebook had it: the engine's runs its attention in fewer
        # ops (engine.attention), part of what (b) is measured against.
        self.visual = copy.deepcopy(models.clip.visual)
        stock_attention(self.visual)
        if self.half:
            # clip.load(..., device="cuda") keeps OpenAI's fp16 weights: convert_weights halves the
            # convolutions, linears and attention and leaves LayerNorm in fp32 (a plain .half()
            # makes CLIP's fp32 LayerNorm meet fp16 weights: "expected scalar type Float").
            clip.model.convert_weights(self.visual)
        self.decoder = models.decoder   # the engine's: none of dall_e's own fp16 casts (engine.models)
        if self.half:
            # OpenAI's decoder.pkl as the notebook loaded it: dall_e's Conv2d casts to fp16 on CUDA.
            self.decoder = copy.deepcopy(models.decoder)
            for module in self.decoder.modules():
                if hasattr(module, "use_float16"):
                    module.use_float16 = True
        if unfrozen:
            self.visual = copy.deepcopy(self.visual).requires_grad_(True)
            self.decoder = copy.deepcopy(self.decoder).requires_grad_(True)
        self.resolution = int(models.clip.visual.input_resolution)
        self.text = targets.embeddings[:1].to(self.device)  # [1, D], the first prompt part
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        vocab, g = models.vocab_size, settings.grid
        codes = torch.randint(vocab, (g, g), device=self.device)
        self.logits = torch.nn.Parameter(F.one_hot(codes, vocab).permute(2, 0, 1)[None].float())
        self.optimizer = torch.optim.Adam([self.logits], lr=settings.lr)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device)[:, None, None]
        self.std = torch.tensor(CLIP_STD, device=self.device)[:, None, None]
        self.iteration = 0
        self.frames: list[torch.Tensor] = []

    def soft_codes(self) -> torch.Tensor:
        s = self.settings
        if s.split_softmax:  # the notebook's (1, 4096, -1) reshape
            v = self.logits.shape[1]
            flat = self.logits.view(1, v // 2, -1)
            return F.gumbel_softmax(flat, tau=s.tau, dim=1).view_as(self.logits)
        return F.gumbel_softmax(self.logits, tau=s.tau, dim=1)

    def image(self, codes: torch.Tensor) -> torch.Tensor:
        return unmap_pixels(torch.sigmoid(self.decoder(codes)[:, :3].float()))  # [1, 3, 8g, 8g]

    def cutouts(self, image: torch.Tensor) -> torch.Tensor:
        s, side = self.settings, image.shape[-1]
        pieces = []
        for _ in range(s.cutn):
            size = int(side * random.uniform(s.cut_min, s.cut_max))
            x, y = random.randint(0, side - size), random.randint(0, side - size)
            piece = image[:, :, y:y + size, x:x + size]
            piece = F.interpolate(piece, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
            angle = random.uniform(-s.rotate_degrees, s.rotate_degrees)
            pieces.append(TF.rotate(piece, angle, interpolation=TF.InterpolationMode.BILINEAR))
        into = torch.cat(pieces)  # [cutn, 3, R, R]
        into = into + s.noise * torch.rand(s.cutn, 1, 1, 1, device=self.device) * torch.randn_like(into)
        return (into - self.mean) / self.std

    def step(self) -> None:
        s = self.settings
        image = self.image(self.soft_codes())
        into = self.cutouts(image)
        emb = self.visual(into.half() if self.half else into).float()  # [cutn, D]: CLIP's encode_image
        loss = -torch.cosine_similarity(self.text, emb, dim=-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = min(s.lr * s.lr_growth ** self.iteration, s.lr_max)
        self.optimizer.step()
        self.iteration += 1
        if self.iteration % s.frame_every == 0:
            with torch.no_grad():  # the notebook saved a PNG every 50 steps
                frame = self.image(F.one_hot(self.logits.argmax(1), self.logits.shape[1]).permute(0, 3, 1, 2).float())
                self.frames.append((frame[0].clamp(0, 1) * 255).byte().cpu())
                self.frames = self.frames[-1:]

