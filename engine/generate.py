"""The optimisation loop: CLIP-guided search over the DALL-E dVAE decoder's codebook logits.

advadnoun's prototype (2021), as DESIGN.md describes it: learnable logits [B, 8192, g, g] from
random one-hot codes; each step a gumbel-softmax (tau 2), the decoder, sigmoid + unmap_pixels;
`cutn` random cut-outs (0.5-0.99 of a side, random offset, up to 30 degrees of rotation, a little
noise) resized to CLIP's input; loss = minus the weighted mean cosine similarity to the targets.
Adam on the logits only, lr 0.01 growing x1.005 a step up to 0.12.

`BatchRunner` steps many jobs ("slots") in one forward/backward pass; each slot has its own
logits, optimiser, random generator and iteration count, so a job's frames do not depend on which
other jobs share its batch. `generate()` is the one-job loop on top of it.

Nothing here reads globals or writes files: settings, a cancel token and progress callbacks (per
frame, and `generate`'s per step) come in as arguments.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dall_e import unmap_pixels

from engine.compiling import check_cuda_graphs, compile_options
from engine.graphs import Capture, capture_step, make_capturable, portable_optimizer_state, set_lr, side_stream
from engine.models import Models
from engine.prompts import MAX_PROMPT_PARTS, PromptError, PromptPart, parse_prompt  # noqa: F401 - re-exported

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class GenerationSettings:
    """Everything that decides a run. The defaults are the seed article's notebook."""

    iterations: int = 1000          # optimiser steps; frames at 0, frame_every, ..., iterations
    frame_every: int = 50
    grid: int = 64                  # logits grid; the image is 8 * grid pixels a side
    cutn: int = 12
    tau: float = 2.0
    lr: float = 0.01
    lr_growth: float = 1.005
    lr_max: float = 0.12
    cut_min: float = 0.5
    cut_max: float = 0.99
    rotate_degrees: float = 30.0
    noise: float = 0.1
    seed: int = 0
    split_softmax: bool = False     # the notebook's (1, 4096, -1) reshape quirk: two softmaxes of 4096 (even, odd codes)
    precision: str = "auto"         # auto | fp32 | bf16 | fp16 (autocast on CUDA; fp32 on CPU)

    def validate(self) -> None:
        problems = []
        if self.iterations < 1:
            problems.append("iterations must be at least 1")
        if self.frame_every < 1:
            problems.append("frame_every must be at least 1")
        if self.grid < 2:
            problems.append("grid must be at least 2")
        if self.cutn < 1:
            problems.append("cutn must be at least 1")
        if not 0 < self.cut_min <= self.cut_max <= 1:
            problems.append("need 0 < cut_min <= cut_max <= 1")
        if self.tau <= 0:
            problems.append("tau must be positive")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append("precision must be auto, fp32, bf16 or fp16")
        if problems:
            raise ValueError("; ".join(problems))

    def frame_iterations(self) -> list[int]:
        its = list(range(0, self.iterations + 1, self.frame_every))
        if its[-1] != self.iterations:
            its.append(self.iterations)
        return its

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- prompts (parse_prompt, PromptPart: engine.prompts, torch-free) ------------------------------

def tokenize(texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, list[str]]:
    """CLIP tokens [T, context_length]; texts over CLIP's limit are truncated, with a warning each."""
    warnings_out = []
    rows = []
    for text in texts:
        try:
            rows.append(clip.tokenize([text], context_length=context_length))
        except RuntimeError:
            rows.append(clip.tokenize([text], context_length=context_length, truncate=True))
            warnings_out.append(
                f"the prompt {text[:40]!r}... is longer than CLIP's {context_length} tokens: truncated"
            )
    return torch.cat(rows), warnings_out


@dataclass
class Targets:
    """What a slot pulls toward (positive weight) or away from (negative): unit embeddings [T, D]."""

    embeddings: torch.Tensor        # [T, D], unit length
    weights: torch.Tensor           # [T]
    labels: list[str]
    warnings: list[str] = field(default_factory=list)
    # The part a frame's `similarity` reports: the first one pulled toward (the parse requires one),
    # not a negative part, whose similarity falls as the picture gets better.
    headline: int = 0


@torch.no_grad()
def encode_targets(
    models: Models, prompt: str | Sequence[PromptPart], image_targets: Sequence[tuple[torch.Tensor, float, str]] = ()
) -> Targets:
    """Embed the prompt's parts once per job (and image prompts: [3, H, W] in 0..1, weight, label)."""
    # A positive image prompt is a target to pull toward as a positive part is (engine.prompts).
    # Not strict: the prompt was checked when it was queued (perhaps by an older version's rules).
    parts = (parse_prompt(prompt, [w for _, w, _ in image_targets], strict=False) if isinstance(prompt, str)
             else list(prompt))
    tokens, notes = tokenize([p.text for p in parts], models.clip.context_length)
    text = models.clip.encode_text(tokens.to(models.device)).float()  # [T, D]
    embeddings = [F.normalize(text, dim=-1)]
    weights = [p.weight for p in parts]
    labels = [p.text for p in parts]
    for image, weight, label in image_targets:
        embeddings.append(F.normalize(_clip_embed(models, image[None].to(models.device)), dim=-1))
        weights.append(weight)
        labels.append(label)
    return Targets(
        embeddings=torch.cat(embeddings),
        weights=torch.tensor(weights, dtype=torch.float32, device=models.device),
        labels=labels,
        warnings=notes,
        headline=next((i for i, w in enumerate(weights) if w > 0), 0),
    )


def _clip_embed(
    models: Models, images: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """CLIP image embeddings [N, D] of images [N, 3, H, W] in 0..1 (resized, normalised). A
    picture larger than CLIP's side (a frame of grid 64: 512) is shrunk with antialiasing, so
    detail finer than the new pixels is averaged rather than aliased into patterns of its own."""
    res = models.clip_resolution
    if images.shape[-1] != res or images.shape[-2] != res:
        images = F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    mean, std = norm if norm is not None else _clip_norm(images.device, images.dtype)
    return models.clip.encode_image((images - mean) / std).float()


@functools.lru_cache(maxsize=None)
def _clip_norm(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std [3, 1, 1], made once per device: a tensor built from host values on a
    GPU is a copy that waits for the device (a host sync), so not in every step."""
    mean = torch.tensor(CLIP_MEAN, dtype=dtype)[:, None, None].to(device)
    std = torch.tensor(CLIP_STD, dtype=dtype)[:, None, None].to(device)
    return mean, std


# --- one step's pieces -------------------------------------------------------------------------


def random_one_hot_logits(vocab: int, grid: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    codes = torch.randint(vocab, (grid, grid), generator=generator, device=device)  # [g, g]
    return F.one_hot(codes, vocab).permute(2, 0, 1)[None].float()  # [1, V, g, g]


def gumbel_softmax(logits: torch.Tensor, uniforms: torch.Tensor, tau: float, split: bool) -> torch.Tensor:
    """Soft codes [B, V, g, g] from logits [B, V, g, g] and uniform noise of the same shape."""
    gumbels = -torch.log(-torch.log(uniforms.clamp(1e-10, 1 - 1e-7)))
    y = (logits + gumbels) / tau
    if split:  # the notebook's quirk: two softmaxes of V/2 codes per position
        # Its `logits.view(1, V // 2, -1)` softmax over dim 1: the flat [V * g * g] row-major
        # buffer as V/2 rows of codes (2j, 2j + 1) x positions, so each softmax is over the even
        # codes or over the odd ones at a position (not the first half or the second).
        b, v, h, w = y.shape
        return y.view(b, v // 2, 2, h, w).softmax(dim=1).view(b, v, h, w)
    return y.softmax(dim=1)


def cutout_grid(
    n: int, size: int, cut_min: float, cut_max: float, degrees: float,
    generator: torch.Generator, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grids [n, size, size, 2] for n random square cut-outs, each resized to `size` and
    rotated, as one affine map; and a mask [n, 1, size, size] of the rotated square's inside
    (outside it the picture is black, as a rotated crop's corners are). `cutout_affine` says how."""
    scale = torch.rand(n, generator=generator, device=device) * (cut_max - cut_min) + cut_min  # [n]
    # Offsets keep the cut-out inside the image: centre within +-(1 - scale) in [-1, 1] coords.
    centre = (torch.rand(n, 2, generator=generator, device=device) * 2 - 1) * (1 - scale)[:, None]
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(degrees)
    return cutout_affine(scale, centre, angle, size)


def cutout_affine(
    scale: torch.Tensor, centre: torch.Tensor, angle: torch.Tensor, size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grids [n, S, S, 2] and masks [n, 1, S, S] of n given cut-outs: scale [n] (a side, as a
    fraction of the image's), centre [n, 2] (x, y in the image's [-1, 1] coordinates), angle [n]
    (radians). What the seed loop does in three steps (crop the axis-aligned square `centre +-
    scale`, resize it to S, torchvision's `rotate` by `degrees(angle)`, black where nothing of the
    crop lands), as one affine map: output pixel xy ([-1, 1] coords) samples the crop at R(angle)·xy
    (crop coords, the crop being |p| <= 1), i.e. the image at scale·R·xy + centre. The mask is 1
    where that point lies in the crop: R·xy is inside the square, not xy (which always is)."""
    n = scale.shape[0]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    theta = torch.cat([rot * scale[:, None, None], centre[:, :, None]], dim=2)  # [n, 2, 3]
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)  # [n, S, S, 2]
    local = (grid - centre[:, None, None, :]) / scale[:, None, None, None]  # crop coords: R·xy
    mask = (local.abs() <= 1).all(dim=-1)[:, None].float()  # [n, 1, S, S]
    return grid, mask


def cutout_params(
    cutn: int, size: int, settings: "GenerationSettings", generator: torch.Generator, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One slot's random cut-outs: sampling grids [cutn, S, S, 2], masks [cutn, 1, S, S] and noise
    [cutn, 3, S, S], drawn from the slot's own generator (the order of draws is part of a seed's
    meaning: grid, then noise)."""
    grid, mask = cutout_grid(cutn, size, settings.cut_min, settings.cut_max, settings.rotate_degrees, generator, device)
    facs = torch.rand(cutn, 1, 1, 1, generator=generator, device=device) * settings.noise
    noise = facs * torch.randn(cutn, 3, size, size, generator=generator, device=device)
    return grid, mask, noise


def apply_cutouts(
    images: torch.Tensor, cutn: int, grids: torch.Tensor, masks: torch.Tensor, noise: torch.Tensor,
) -> torch.Tensor:
    """[B, 3, H, W] and the batch's grids/masks/noise ([B * cutn, ...]) -> [B * cutn, 3, S, S]."""
    source = images.repeat_interleave(cutn, dim=0)  # [B * cutn, 3, H, W]
    cuts = F.grid_sample(source, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    return cuts * masks + noise


def make_cutouts(
    images: torch.Tensor, cutn: int, size: int, settings: Sequence["GenerationSettings"],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """[B, 3, H, W] -> [B * cutn, 3, size, size]: every slot's cut-outs in one grid_sample."""
    params = [cutout_params(cutn, size, s, g, images.device) for s, g in zip(settings, generators)]
    grids, masks, noise = (torch.cat(p) for p in zip(*params))
    return apply_cutouts(images, cutn, grids, masks, noise)


def decode(models: Models, soft_codes: torch.Tensor) -> torch.Tensor:
    """Soft or one-hot codes [B, V, g, g] -> images [B, 3, 8g, 8g] in 0..1."""
    return _decode_with(models.decoder, soft_codes)


def _decode_with(decoder: torch.nn.Module, soft_codes: torch.Tensor) -> torch.Tensor:
    out = decoder(soft_codes.float())  # [B, 6, 8g, 8g]
    return unmap_pixels(torch.sigmoid(out[:, :3].float()))


def frame_image(models: Models, logits: torch.Tensor) -> torch.Tensor:
    """The picture a frame shows: the decoder on each position's most likely code, [B, 3, H, W].
    Deterministic (no noise), so a remix's frame 0 is its parent's final frame, pixel for pixel."""
    codes = F.one_hot(logits.argmax(dim=1), logits.shape[1]).permute(0, 3, 1, 2).float()
    return decode(models, codes)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in 0..1 -> [H, W, 3] uint8."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --- slots and the batched step ----------------------------------------------------------------


@dataclass
class Frame:
    """A picture taken every `frame_every` iterations (and at the last)."""

    iteration: int
    total: int
    pixels: np.ndarray               # [H, W, 3] uint8
    similarity: float                # cosine similarity of the picture to the first positive part
    similarities: list[float]        # to every target, in Targets.labels order
    loss: float                      # the step's training loss (augmented views)
    elapsed: float

    def png(self) -> bytes:
        return png_bytes(self.pixels)


class NonFiniteError(FloatingPointError):
    """A slot's loss, logits or optimiser state went NaN or infinite (e.g. an fp16 overflow on a
    GPU): Adam keeps NaN logits NaN for good, and their argmax is a flat picture of code 0, so the
    job cannot go on. Found when a frame is taken (the host reads the device only then)."""


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


ProgressCallback = Callable[[Frame], None]
StepCallback = Callable[[int], None]     # the iterations done after a step (generate's on_step)


_MOMENTS = ("exp_avg", "exp_avg_sq")   # Adam's per-parameter moments, each the logits' shape


def _is_step_count(value: Any) -> bool:
    """Whether a saved Adam step count is one: a finite number >= 0 (a 0-d tensor or a Python
    int / float, not a bool). Read on the host: load time, not the hot loop."""
    if torch.is_tensor(value):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return False
        value = value.item()
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


class Slot:
    """One job's state inside a batch."""

    def __init__(
        self, key: Any, models: Models, targets: Targets, settings: GenerationSettings,
        init_logits: torch.Tensor | None = None, checkpoint: dict[str, Any] | None = None,
    ):
        settings.validate()
        self.key = key
        self.settings = settings
        self.targets = targets
        self.generator = torch.Generator(device=models.device)
        self.generator.manual_seed(settings.seed)
        if init_logits is None:
            init_logits = random_one_hot_logits(models.vocab_size, settings.grid, self.generator, models.device)
        want = (1, models.vocab_size, settings.grid, settings.grid)
        if tuple(init_logits.shape) != want:   # one job's logits: a batch of them is not a start
            raise ValueError(f"initial logits {tuple(init_logits.shape)} do not fit this job's {want} "
                             f"(grid {settings.grid})")
        self.logits = torch.nn.Parameter(init_logits.detach().clone().float().to(models.device))  # [1, V, g, g]
        # Fused: one kernel a step for the slot's Adam instead of about a dozen (the default,
        # foreach, for one tensor), on CUDA and on a CPU; B slots launch B of them a step.
        self.optimizer = torch.optim.Adam([self.logits], lr=settings.lr, fused=True)
        self.iteration = 0
        # Steps of the learning-rate ramp taken before this run's first (`lr`): a Continue's
        # parent's steps (theirs and their parent's: `as_continue`), so its ramp goes on where
        # the parent's left off, as Adam's step count does. Saved in the state; 0 for a new run.
        self.lr_offset = 0
        # The last step's loss stays on the device (a 0-d tensor): reading it is a host sync,
        # done only when a frame is taken (`last_loss`).
        self.loss: torch.Tensor | None = None
        self.started = time.perf_counter()
        # The device type whose generator state load_state could not take (None: none such): the
        # run then continues with noise of its own (see load_state).
        self.reseeded_from: str | None = None
        if checkpoint is not None:
            self.load_state(checkpoint)

    @property
    def last_loss(self) -> float:
        """The last step's training loss as a float (a host sync: read it only with a frame)."""
        return float("nan") if self.loss is None else float(self.loss)

    @property
    def done(self) -> bool:
        return self.iteration >= self.settings.iterations

    def lr(self) -> float:
        """The step's learning rate: `lr * lr_growth ** steps`, at most `lr_max`, where `steps`
        counts the ramp's steps before it, the parent's too for a Continue (`lr_offset`)."""
        s = self.settings
        steps = self.lr_offset + self.iteration
        if s.lr_growth > 1 and s.lr > 0:
            # Past ceil(log(lr_max / lr) / log(growth)) steps the ramp is at lr_max: the power is
            # capped there (+1 against rounding), so a huge count never overflows a float.
            top = math.ceil(math.log(s.lr_max / s.lr) / math.log(s.lr_growth)) + 1 if s.lr_max > s.lr else 0
            steps = min(steps, top)
        return min(s.lr * s.lr_growth ** steps, s.lr_max)

    def as_continue(self) -> None:
        """Make this slot, just loaded with a finished parent's state (`load_state`), the parent's
        Continue: a fresh count of iterations (its frames and end), with the learning-rate ramp
        going on from where the parent's stopped (`lr_offset`), as the optimiser's step count does,
        so N steps and a Continue of M take the steps one run of N + M would."""
        self.lr_offset += self.iteration
        self.iteration = 0

    def adam_step(self) -> None:
        """The optimiser's step on the logits' gradient. Fused Adam trusts its moments' shapes and
        layout (one that does not fit the logits corrupts memory instead of raising, where the
        unfused Adam raised), so they are checked first, from metadata only: no host sync.
        (`load_state` makes them fit; this is for whatever else sets them.)"""
        moments = self.optimizer.state.get(self.logits, {})
        for name in _MOMENTS:
            value = moments.get(name)
            if value is not None and (not torch.is_tensor(value) or value.shape != self.logits.shape
                                      or value.stride() != self.logits.stride()):
                raise ValueError(f"Adam's {name} {tuple(getattr(value, 'shape', ()))} does not fit the logits "
                                 f"{tuple(self.logits.shape)}: the job's optimiser state is damaged")
        self.optimizer.step()

    def wants_frame(self) -> bool:
        return self.iteration % self.settings.frame_every == 0 or self.done

    def state(self) -> dict[str, Any]:
        """A snapshot of everything needed to resume exactly: logits, Adam's moments and step count,
        the RNG, the iteration, the lr ramp's offset. Every tensor in it is a CPU copy taken now,
        never one the optimiser still updates: the worker's GPU thread hands it to the asyncio side and steps on while that
        side serialises it, so live tensors (`optimizer.state_dict()`'s are) would mix iteration N's
        logits with the moments of a later step (a torn checkpoint, which resumes elsewhere).
        On CUDA the copies are blocking: the snapshot waits for the step's kernels (a host sync,
        paid only when a checkpoint or the final state is taken)."""
        return {
            "iteration": self.iteration,
            "lr_offset": self.lr_offset,                             # the ramp's steps before this run's
            "logits": _cpu_copy(self.logits),                        # [1, V, g, g]
            # exp_avg, exp_avg_sq: [1, V, g, g]; step: []. Portable: a graphed slot's Adam is capturable.
            "optimizer": portable_optimizer_state(_cpu_copy(self.optimizer.state_dict())),
            "generator": self.generator.get_state().clone(),         # already a host tensor; clone: ours
            "settings": self.settings.to_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over a `state()` (a checkpoint, or a parent's state.pt, maybe `compact_state`d: it is
        brought back to fp32 here). A state whose tensors do not fit this slot is refused here, at
        the start (ValueError, `check_state`), not at its first step: there it would fail the whole batch."""
        state = check_state(state, tuple(self.logits.shape))
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(self.logits.device))
        # Loading takes the saved groups' settings: fused as this slot's Adam, whichever Adam
        # saved it (states from before it was fused, another version's worker).
        saved = state["optimizer"]
        groups = [dict(g, fused=True, foreach=None) for g in saved.get("param_groups", [])]
        self.optimizer.load_state_dict(dict(saved, param_groups=groups))
        # The moments as fresh tensors laid out as the logits: fused Adam reads them by the
        # logits' layout (a file's own strides would be read wrongly, or out of bounds), and
        # it must not step on tensors the caller still holds: nor on its step count, which
        # load_state_dict hands over as the caller's own tensor and fused Adam increments in place
        # (a second load of the same state then resumed with the first run's count).
        with torch.no_grad():
            for per_param in self.optimizer.state.values():
                for name in _MOMENTS:
                    per_param[name] = torch.empty_like(self.logits).copy_(per_param[name])
                if torch.is_tensor(per_param.get("step")):
                    per_param["step"] = per_param["step"].clone()
        self.iteration = int(state["iteration"])
        self.lr_offset = int(state.get("lr_offset", 0))   # a state saved before there was one: 0
        self._load_generator(state["generator"])

    # A generator's state (a uint8 tensor) tells its device type by its size: CPU's Mersenne Twister
    # keeps 5056 bytes, CUDA's Philox a seed and an offset (16 bytes).
    _GENERATOR_KINDS = {5056: "CPU", 16: "CUDA"}

    def _load_generator(self, saved: Any) -> None:
        """The saved random generator, when this device's generator can take it. A state saved on
        another device type (a checkpoint or Continue made on a CUDA worker, resumed on a CPU one,
        or the reverse: a mixed fleet) cannot be: the two generators have nothing in common. The
        run is not failed for that (the job would fail on every worker of this type, retried for
        nothing): its logits, optimiser and iteration are taken exactly and the generator is
        seeded anew, deterministically (from the job's seed and the iteration), so it continues
        with different noise than it would have drawn where it started. The frames already made
        stay as they were; other device types compute slightly differently anyway, so an exact
        replay across them was never on offer. `reseeded_from` says it happened, and it is logged."""
        current = self.generator.get_state()
        if not torch.is_tensor(saved) or saved.dtype != torch.uint8 or saved.dim() != 1:
            raise ValueError(f"this state's random generator is not a generator state "
                             f"({type(saved).__name__} {getattr(saved, 'dtype', '')}): the state is damaged")
        if saved.numel() == current.numel():
            self.generator.set_state(saved.to(current.device))
            return
        mine = self._GENERATOR_KINDS.get(current.numel(), self.generator.device.type.upper())
        theirs = self._GENERATOR_KINDS.get(saved.numel())
        if theirs is None or theirs == mine:
            raise ValueError(f"this state's random generator ({saved.numel()} bytes) was saved on a device "
                             f"type this {mine} worker does not know: the state cannot be resumed here")
        import hashlib

        seed = int.from_bytes(hashlib.sha256(f"{self.settings.seed}:{self.iteration}:{theirs}".encode())
                              .digest()[:8], "big") & (2**63 - 1)
        self.generator.manual_seed(seed)
        self.reseeded_from = theirs
        log.warning("job %s: this state's random generator was saved on a %s worker, which this %s worker "
                    "cannot take: it resumes at iteration %d with the same logits and optimiser state, and "
                    "a new generator seeded from the job's seed and the iteration (different noise from "
                    "there on)", self.key, theirs, mine, self.iteration)


def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor, on the tensors' device (no host sync): every element of every one finite.
    Each tensor's min and max (one pass, no tensor of its size made: isfinite().all() is ~20x
    slower on a CPU): NaN propagates through aminmax, and an infinity is the min or the max."""
    return torch.isfinite(torch.stack([torch.stack(torch.aminmax(t.detach())) for t in tensors])).all()


def _moments(slot: Slot) -> list[torch.Tensor]:
    """The slot's Adam moments (exp_avg, exp_avg_sq: [1, V, g, g]; none before its first step)."""
    return [v for v in slot.optimizer.state.get(slot.logits, {}).values() if torch.is_tensor(v) and v.dim() > 0]


def _cpu_copy(value: Any) -> Any:
    """`value` with every tensor replaced by a detached CPU copy of it (dicts, lists and tuples
    walked; anything else is immutable here: numbers, strings, None)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def compact_state(state: dict[str, Any]) -> dict[str, Any]:
    """A `Slot.state()` to keep (a finished job's state.pt, for Continue and Remix), in half the
    bytes: logits in fp16, Adam's moments (the tensors of the logits' shape) in bf16; the step
    count, the RNG and the rest unchanged. `Slot.load_state` (`expand_state`) brings it back to fp32.

    What a reader gets back: logits within fp16's rounding (2^-11 relative), except that where
    rounding would change which code wins at a position (the picture is the argmax), the winner is
    raised by one fp16 step, so the decoded picture, and a Remix's frame 0, stay exactly the
    parent's final frame; moments within bf16's (2^-8 relative; bf16 keeps fp32's exponent range,
    so tiny second moments do not underflow as they would in fp16). Logits beyond fp16's range
    (not reached by the lr schedule: 0.12 a step at most) stay fp32. Mid-run checkpoints are never
    compacted: a resume must be exact."""
    logits = state["logits"]                                        # [1, V, g, g] fp32
    out = dict(state, logits=_half_keeping_argmax(logits))
    optimizer = dict(state["optimizer"])
    optimizer["state"] = {
        index: {name: value.to(torch.bfloat16)
                if torch.is_tensor(value) and value.dtype == torch.float32 and value.shape == logits.shape
                else value
                for name, value in per_param.items()}
        for index, per_param in state["optimizer"].get("state", {}).items()
    }
    out["optimizer"] = optimizer
    return out


def _half_keeping_argmax(logits: torch.Tensor) -> torch.Tensor:
    """fp16 logits [1, V, g, g] with the same argmax over V as the fp32 ones at every position."""
    if logits.dtype != torch.float32:
        return logits
    half = logits.to(torch.float16)
    if not torch.isfinite(half).all() and torch.isfinite(logits).all():
        return logits                                               # out of fp16's range: keep fp32
    want = logits.argmax(dim=1, keepdim=True)                       # [1, 1, g, g]
    moved = half.argmax(dim=1, keepdim=True) != want                # a near-tie rounded the other way
    if moved.any():
        top = half.max(dim=1, keepdim=True).values                  # [1, 1, g, g]
        raised = torch.nextafter(top, torch.full_like(top, float("inf")))
        winner = half.gather(1, want)
        half.scatter_(1, want, torch.where(moved, raised, winner))
    return half


def check_state(state: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    """A `Slot.state()` (a checkpoint, a parent's state.pt: read from a shared store) checked
    against the logits `shape` of the slot that would take it ([1, V, g, g]), without a slot:
    what `Slot.load_state` refuses, found where the state is read. Returns it `expand_state`d.
    ValueError when it is not what `state()` writes for such a slot: its keys, the logits, Adam's
    single group, moments and step count, the generator's form, the iteration and lr offset. (Whether the
    generator can be taken on this device is `load_state`'s to decide.)"""
    def damaged(what: str) -> ValueError:
        return ValueError(f"{what}: the state is damaged")

    if not isinstance(state, dict):
        raise damaged(f"the state is a {type(state).__name__}, not a dict")
    missing = [key for key in ("iteration", "logits", "optimizer", "generator") if key not in state]
    if missing:
        raise damaged(f"the state has no {', '.join(missing)}")
    iteration = state["iteration"]
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise damaged(f"the saved iteration {iteration!r} is not a count")
    lr_offset = state.get("lr_offset", 0)   # absent in a state saved before there was one
    if isinstance(lr_offset, bool) or not isinstance(lr_offset, int) or lr_offset < 0:
        raise damaged(f"the saved learning-rate offset {lr_offset!r} is not a count")
    logits, optimizer = state["logits"], state["optimizer"]
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise damaged(f"the saved logits are a {type(logits).__name__} {getattr(logits, 'dtype', '')}")
    if (not isinstance(optimizer, dict) or not isinstance(optimizer.get("state", {}), dict)
            or not all(isinstance(per_param, dict) for per_param in optimizer.get("state", {}).values())):
        raise damaged("the saved optimiser state is not Adam's")
    groups = optimizer.get("param_groups")
    # One group of one parameter (the logits), by its index: load_state_dict raises on any other
    # count, and a state for a parameter the group does not hold would be kept unused.
    params = groups[0].get("params") if isinstance(groups, list) and groups and isinstance(groups[0], dict) else None
    if (params is None or len(groups) != 1 or not isinstance(params, list) or len(params) != 1
            or isinstance(params[0], bool) or not isinstance(params[0], int)
            or not set(optimizer.get("state", {})) <= set(params)):
        raise damaged("the saved optimiser state is not one group of the logits alone")
    generator = state["generator"]
    if not torch.is_tensor(generator) or generator.dtype != torch.uint8 or generator.dim() != 1:
        raise damaged(f"this state's random generator is not a generator state "
                      f"({type(generator).__name__} {getattr(generator, 'dtype', '')})")
    state = expand_state(state)
    if tuple(state["logits"].shape) != shape:
        raise ValueError(f"the saved logits {tuple(state['logits'].shape)} do not fit this job's {shape}")
    for per_param in state["optimizer"].get("state", {}).values():
        for name, value in per_param.items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != shape:
                raise ValueError(f"the saved optimiser state {name!r} {tuple(value.shape)} does not fit "
                                 f"this job's logits {shape}")
        # Fused Adam takes what it is given: a moment of another shape, or a step count that
        # is no count (a bool, NaN), would corrupt memory or the run instead of raising.
        for name in _MOMENTS:
            value = per_param.get(name)
            if not torch.is_tensor(value) or tuple(value.shape) != shape or not value.is_floating_point():
                raise ValueError(f"the saved optimiser state {name!r} is missing or does not fit this job's "
                                 f"logits {shape}: the state is damaged")
        if not _is_step_count(per_param.get("step")):
            raise ValueError(f"the saved optimiser step count {per_param.get('step')!r} is not a count: "
                             "the state is damaged")
    return state


def state_is_finite(state: dict[str, Any]) -> bool:
    """Whether a `Slot.state()`'s logits and Adam moments are all finite (its host copies: a read,
    no sync). A diverged run's state: resumed, its next frame fails with NonFiniteError."""
    tensors = [state["logits"], *(v for per_param in state["optimizer"].get("state", {}).values()
                                  for v in per_param.values() if torch.is_tensor(v) and v.dim() > 0)]
    return bool(_all_finite(*tensors))


def expand_state(state: dict[str, Any]) -> dict[str, Any]:
    """Undo `compact_state`: every fp16 / bf16 tensor of the logits and the optimiser state back to
    fp32 (a state that is already fp32 comes back as it is)."""
    def fp32(value: Any) -> Any:
        if torch.is_tensor(value) and value.dtype in (torch.float16, torch.bfloat16):
            return value.float()
        return value

    optimizer = dict(state["optimizer"])
    optimizer["state"] = {index: {name: fp32(v) for name, v in per_param.items()}
                          for index, per_param in state["optimizer"].get("state", {}).items()}
    return dict(state, logits=fp32(state["logits"]), optimizer=optimizer)


def state_to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict[str, Any]:
    # weights_only: a checkpoint is tensors and plain values; never unpickle code from a store.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _chain(exc: BaseException, contexts: bool = True) -> list[BaseException]:
    """`exc` and what it wraps: its `__cause__`, dynamo's `inner_exception`, and (with `contexts`)
    the `__context__` it was raised while handling; outermost first, each once."""
    links: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not seen for seen in links) and len(links) < 16:
        links.append(link)
        link = link.__cause__ or getattr(link, "inner_exception", None) or (link.__context__ if contexts else None)
    return links


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, Python's, or the CPU allocator's (a RuntimeError), also where
    another error wraps it (torch.compile's BackendCompilerFailed, when autotuning runs out)."""
    return any(isinstance(link, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(link)
               for link in _chain(exc))


def _undo_draws(slots: list[Slot], noise: list[torch.Tensor]) -> None:
    """Put back each slot's generator as it was before a pass (`noise`: their host states, read
    without a device sync) and drop the pass's gradients: the pass is as if it never ran."""
    for s, state in zip(slots, noise):
        s.generator.set_state(state)
        s.optimizer.zero_grad(set_to_none=True)


def _autocast_dtype(models: Models, precision: str) -> torch.dtype | None:
    """The dtype a pass of `precision` autocasts to; None: no autocast (a CPU, or fp32)."""
    if models.device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def _autocast(models: Models, precision: str):
    """Autocast without its cache, always: a CUDA graph's capture needs it off, and a step before
    the capture must run with the same setting (dynamo guards on it: a compiled region would be
    compiled again inside the capture, which dynamo refuses). It costs nothing here: the cache
    keeps casts of fp32 leaves that require grad, and the models are frozen (the logits reach
    autocast only through torch.cat)."""
    dtype = _autocast_dtype(models, precision)
    if dtype is None:
        return torch.autocast(device_type=models.device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=False)


def batch_key(settings: GenerationSettings) -> tuple[Any, ...]:
    """Slots whose keys are equal share one forward/backward pass: the tensors' shapes (grid, cutn)
    and what applies to the whole batch (autocast precision, the softmax's shape and temperature)."""
    return (settings.grid, settings.cutn, settings.precision, settings.split_softmax, settings.tau)


class BatchRunner:
    """Steps every slot in as few forward and backward passes as there are batch keys (`batch_key`:
    slots of different grid sizes or cut-out counts run in separate batches).

    Slots join (`add`) and leave (`remove`) between steps. A slot's result depends only on its own
    seed, settings and targets: its noise comes from its own generator, its loss is its own term
    of a sum whose gradient reaches only its own logits, its optimiser is its own.

    The hot loop never waits for the device: a step queues its kernels and returns; the losses
    stay on the device and are read (one sync) only when a frame is taken.

    `compile`: opt-in `torch.compile` of the differentiable part (soft codes -> CLIP embeddings of
    the cut-outs): `True` for inductor, `"auto"` (inductor on CUDA where a C compiler is found), or
    `"BACKEND"` / `"BACKEND:MODE"` (`compile_options`; `"inductor:reduce-overhead"` adds CUDA
    graphs). Dynamic shapes, so slots joining and leaving do not recompile for every batch size.
    Off by default here (one-off renders would wait minutes for a compile that saves seconds); the
    worker's default is `"auto"`. If compiling fails the runner says so once and runs eager.

    `cuda_graphs`: on CUDA, a slot alone in its batch (no other unfinished slot of its batch key)
    has its whole step captured as a CUDA graph (`engine.graphs`) after GRAPH_WARMUP_STEPS steps on
    a side stream, and replayed while it stays alone; the graph is dropped (its memory freed) when
    another slot joins its batch or it leaves. Batches that run in passes of one (`pass_limit`, or
    a failed pass's halves) have no graphs: one per slot would hold every slot's activations.
    Ignored elsewhere (no graphs on a CPU), and not with compile modes that make graphs of their
    own (`engine.compiling.check_cuda_graphs`). A capture that fails is logged once and the runner
    steps without graphs from then on; one that runs out of memory leaves that slot without one.
    Opt-in until measured on a GPU (docs/PERFORMANCE.md). A capture function may be passed instead
    of True (`engine.graphs.Capture`): tests use one that replays the step eagerly, on a CPU.

    `precast` (default on): under bf16/fp16 autocast on CUDA, passes run copies of CLIP's image
    tower and the decoder whose weights already are that dtype (`_towers`), made when the first
    slot of that precision joins: the same numbers as autocast casting the fp32 weights in every
    step, without those casts. Off: the benchmarks' comparison.

    Failures (`step(on_failure=...)`): a pass that raises is undone (each slot's noise generator
    is put back; nothing else has changed before the optimiser steps) and run again in two halves,
    down to the slot that fails alone, which leaves the runner through `on_failure`; the others
    step as if nothing happened. Out of memory also teaches the runner a smaller pass for that
    batch key (`pass_limit`): later steps run the key's slots in passes of at most that many.
    A slot whose loss, logits or Adam moments are NaN or infinite (an fp16 overflow, say) fails
    alone with NonFiniteError at its next frame, where the host reads the device anyway: the check
    rides on the frame's one read, the steps between frames stay free of syncs.
    """

    def __init__(self, models: Models, compile: bool | str = False, cuda_graphs: bool | Capture = False,
                 precast: bool = True):
        self.models = models
        self.slots: dict[Any, Slot] = {}
        # batch_key -> the most slots one pass holds, learned from out-of-memory errors (absent:
        # no limit). Kept for the runner's life: memory freed later is not probed again.
        self.pass_limit: dict[tuple[Any, ...], int] = {}
        self._norm = _clip_norm(models.device, torch.float32)
        norm = self._norm

        # Closures over the models, not methods: a bound method kept on self would make every
        # runner a reference cycle, whose slots (logits, Adam's moments) only the garbage
        # collector frees.
        def decode_soft(decoder: torch.nn.Module, logits: torch.Tensor, uniforms: torch.Tensor, tau: float,
                        split: bool) -> torch.Tensor:
            """logits [B, V, g, g] and their uniform noise -> pictures [B, 3, 8g, 8g] in 0..1."""
            return _decode_with(decoder, gumbel_softmax(logits, uniforms, tau, split))

        def embed_cuts(visual: torch.nn.Module, cuts: torch.Tensor) -> torch.Tensor:
            """Cut-outs [N, 3, R, R] -> unit CLIP embeddings [N, D] (CLIP's encode_image)."""
            mean, std = norm
            return F.normalize(visual((cuts - mean) / std).float(), dim=-1)

        self._decode_soft, self._embed_cuts = self._eager = decode_soft, embed_cuts
        options = compile_options(compile, models.device.type)
        self.compiled = options is not None   # False again if compiling fails (`_compile_failed`)
        if options is not None:
            # Two regions: grid_sample between them stays eager (its decomposition would pin the
            # batch size and recompile whenever a slot joins or leaves).
            self._decode_soft = torch.compile(decode_soft, dynamic=True, **options)
            self._embed_cuts = torch.compile(embed_cuts, dynamic=True, **options)
        check_cuda_graphs(compile, cuda_graphs)
        # The capture function, or None for no graphs.
        self._capture: Capture | None = (cuda_graphs if callable(cuda_graphs)
                                         else capture_step if cuda_graphs and models.device.type == "cuda"
                                         else None)
        self._graphs: dict[Any, _SoloGraph] = {}   # slot key -> its graph (a slot alone in its batch)
        self.precast = precast
        # One side stream for every warm-up (a fresh one each time would cache memory apart).
        self._side = torch.cuda.Stream(models.device) if self._capture is not None and models.device.type == "cuda" else None

    def add(self, slot: Slot) -> Slot:
        if slot.key in self.slots:
            raise KeyError(f"slot {slot.key!r} is already running")
        self._towers(slot.settings.precision)   # made here, on the current stream, not inside a pass
        self.slots[slot.key] = slot
        return slot

    def _towers(self, precision: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        """CLIP's image tower and the decoder that a pass of `precision` runs. Under autocast to
        bf16 or fp16 (`precast`, the default), copies whose weights already are that dtype
        (`Models.low_precision`: the same numbers, without a cast kernel per weight per step),
        made once per dtype and kept with the models (`engine.capacity` counts their memory);
        otherwise the models' own."""
        dtype = _autocast_dtype(self.models, precision)
        if dtype is None or not self.precast:
            return self.models.clip.visual, self.models.decoder
        return self.models.low_precision(dtype)

    def remove(self, key: Any) -> Slot | None:
        self._drop_graph(key)
        return self.slots.pop(key, None)

    def _drop_graph(self, key: Any) -> None:
        """Drop the slot's graph (its memory goes when nothing holds it): its `.grad` too, which
        lives in the graph's memory (the next eager pass makes its own)."""
        if self._graphs.pop(key, None) is not None and key in self.slots:
            self.slots[key].logits.grad = None

    def _drop_graphs(self) -> None:
        """Drop every graph (`_drop_graph`) and hand the memory back to CUDA."""
        for key in list(self._graphs):
            self._drop_graph(key)
        if self.models.device.type == "cuda":
            torch.cuda.empty_cache()

    def __len__(self) -> int:
        return len(self.slots)

    def batches(self) -> list[list[Slot]]:
        """The unfinished slots, grouped as the next `step` runs them (in the order they joined)."""
        groups: dict[tuple[Any, ...], list[Slot]] = {}
        for slot in self.slots.values():
            if not slot.done:
                groups.setdefault(batch_key(slot.settings), []).append(slot)
        return list(groups.values())

    def frames(self, slots: Sequence[Slot]) -> list[Frame]:
        """Take a frame of each slot now (no gradient): the picture and its similarities.
        One host sync for all of them. A slot whose loss, logits or optimiser state is not finite
        has no picture to show: NonFiniteError (the first such slot's)."""
        taken = self._frames(slots)
        for got in taken:
            if isinstance(got, NonFiniteError):
                raise got
        return taken  # type: ignore[return-value] - every one a Frame

    def _frames(self, slots: Sequence[Slot]) -> list[Frame | NonFiniteError]:
        """`frames`, each slot's own: its Frame, or the NonFiniteError it fails with."""
        with torch.no_grad():
            with _autocast(self.models, slots[0].settings.precision):
                images = frame_image(self.models, torch.cat([s.logits for s in slots]))  # [B, 3, H, W]
                emb = F.normalize(_clip_embed(self.models, images, self._norm), dim=-1)  # [B, D]
            sims = [slot.targets.embeddings @ emb[i].float() for i, slot in enumerate(slots)]  # [T] each
            nan = torch.full((), float("nan"), device=images.device)
            losses = torch.stack([nan if s.loss is None else s.loss.float() for s in slots])  # [B]
            # Whether each slot is finite: its last loss, and its logits and Adam's moments (what
            # its next steps and its state.pt are made of) [B, 2]. Read back with the rest: frames
            # only, no sync of its own, nothing in the step.
            yes = torch.ones((), dtype=torch.bool, device=images.device)
            finite = torch.stack([torch.stack([yes if s.loss is None else torch.isfinite(s.loss),
                                               _all_finite(s.logits, *_moments(s))]) for s in slots])
            numbers = torch.cat(sims + [losses, finite.flatten().float()])
            pixels = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)  # [B, H, W, 3]
        pixels_np = pixels.cpu().numpy()
        values = numbers.tolist()
        now = time.perf_counter()
        frames: list[Frame | NonFiniteError] = []
        at, b = 0, len(slots)
        for i, slot in enumerate(slots):
            n = len(slot.targets.labels)
            sim = values[at:at + n]
            at += n
            loss_ok, state_ok = values[-2 * b + 2 * i], values[-2 * b + 2 * i + 1]
            if not (loss_ok and state_ok):
                what = " and ".join(name for name, ok in (("loss", loss_ok), ("logits / optimiser state", state_ok))
                                    if not ok)
                frames.append(NonFiniteError(
                    f"non-finite values (NaN or infinity) in this job's {what} at iteration {slot.iteration}: "
                    f"the optimisation diverged (with fp16 precision an overflow is the usual cause; bf16 or "
                    f"fp32 avoids it), and its pictures would be blank from here on"))
                continue
            frames.append(Frame(
                iteration=slot.iteration, total=slot.settings.iterations, pixels=pixels_np[i].copy(),
                similarity=sim[slot.targets.headline], similarities=sim, loss=values[-3 * b + i],
                elapsed=now - slot.started,
            ))
        return frames

    def step(self, on_failure: Callable[[Slot, Exception], None] | None = None
             ) -> list[tuple[Slot, Frame | None]]:
        """One optimiser step for every unfinished slot; returns (slot, frame or None) for each
        that stepped. Without `on_failure` an error propagates (one job: `generate`). With it, a
        failing pass is bisected: a slot that fails alone is removed and handed to
        `on_failure(slot, error)`, and every other slot steps as usual."""
        results: list[tuple[Slot, Frame | None]] = []
        for group in self.batches():
            limit = self.pass_limit.get(batch_key(group[0].settings), len(group))
            for at in range(0, len(group), limit):
                results += self._step_pass(group[at:at + limit], on_failure)
        return results

    def _step_pass(self, slots: list[Slot], on_failure: Callable[[Slot, Exception], None] | None
                   ) -> list[tuple[Slot, Frame | None]]:
        if self._capture is not None:
            key = batch_key(slots[0].settings)
            if len(slots) == 1 and [s for s in self.slots.values() if not s.done and batch_key(s.settings) == key] == slots:
                return self._solo_pass(slots[0], on_failure)
            for s in slots:                           # not alone in its batch: its graph no longer fits
                self._drop_graph(s.key)
        return self._eager_pass(slots, on_failure)

    def _solo_pass(self, slot: Slot, on_failure: Callable[[Slot, Exception], None] | None
                   ) -> list[tuple[Slot, Frame | None]]:
        """A step of a slot alone in its batch, with `cuda_graphs`: its first GRAPH_WARMUP_STEPS
        steps alone run eagerly on a side stream, then its step is captured and replayed. A slot
        with too few steps left to pay for a capture (GRAPH_MIN_REPLAYS) runs eagerly."""
        graph = self._graphs.get(slot.key)
        if graph is None:
            if slot.settings.iterations - slot.iteration < GRAPH_WARMUP_STEPS + GRAPH_MIN_REPLAYS:
                return self._eager_pass([slot], on_failure)
            make_capturable(slot.optimizer)           # before the warm-up: its steps run Adam as the graph will
            graph = self._graphs[slot.key] = _SoloGraph(capture_at=slot.iteration + GRAPH_WARMUP_STEPS)
        if graph.failed:
            return self._eager_pass([slot], on_failure)
        if graph.replay is None and slot.iteration < graph.capture_at:
            with side_stream(self._side):
                return self._eager_pass([slot], on_failure)
        if graph.replay is None and not self._capture_graph(graph, slot):
            return self._eager_pass([slot], on_failure)
        for group in slot.optimizer.param_groups:
            set_lr(group, slot.lr())                  # a fill queued before the replay, which reads it
        assert graph.replay is not None and graph.loss is not None
        try:
            graph.replay()
        except Exception as exc:  # noqa: BLE001 - as an eager pass's error: this job alone
            self._drop_graph(slot.key)
            if on_failure is None:
                raise
            self._fail(slot, exc, on_failure)
            return []
        slot.iteration += 1
        slot.loss = graph.loss[0].clone()             # the graph's tensor is overwritten by the next replay
        return self._with_frames([slot], on_failure)

    def _capture_graph(self, graph: _SoloGraph, slot: Slot) -> bool:
        """Capture the slot's step into `graph`; False when it failed (logged): out of memory leaves
        this slot without a graph, anything else the runner without graphs from now on."""
        try:
            graph.capture(self, slot)
            return True
        except Exception as exc:  # noqa: BLE001 - no job's fault: this slot, or the runner, runs on eager
            root = _chain(exc)[-1]                    # capture_end's error is raised over the body's
            what = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]}"
            # Out of memory, and the capture ended cleanly (it raised nothing over it).
            out_of_memory = isinstance(exc, (torch.OutOfMemoryError, MemoryError))
            # The failed capture's tensors and graph are held by the tracebacks' frames: let them go now.
            for link in _chain(exc):
                traceback.clear_frames(link.__traceback__)
            del exc, root
        if out_of_memory:
            graph.failed = True
            log.warning("capturing a CUDA graph for job %s ran out of memory; it runs without one", slot.key)
            if self.models.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            self._drop_graphs()
            self._capture = None
            log.warning("capturing a CUDA graph failed (%s); this runner steps without CUDA graphs from now on", what)
        return False

    @property
    def cuda_graphs(self) -> bool:
        """Whether a slot alone in its batch is (still) stepped from a CUDA graph."""
        return self._capture is not None

    def _eager_pass(self, slots: list[Slot], on_failure: Callable[[Slot, Exception], None] | None
                    ) -> list[tuple[Slot, Frame | None]]:
        noise = [s.generator.get_state() for s in slots]  # host tensors: no device sync
        failure: Exception | None = None
        try:
            loss = self._gradients(slots)                 # [B]; no slot's logits or optimiser touched yet
        except Exception as exc:  # noqa: BLE001 - bisected: the slot that fails alone leaves
            if on_failure is None and not self.compiled:
                raise
            # The traceback's frames hold the failed pass's tensors: drop them before the halves
            # run (out of memory would strike again), keeping the lines for the log.
            traceback.clear_frames(exc.__traceback__)
            failure = exc
        if failure is not None:
            _undo_draws(slots, noise)
            if self._compile_failed(slots, failure):
                del failure
                return self._step_pass(slots, on_failure)   # eager from now on
            if on_failure is None:
                raise failure
            try:
                return self._split(slots, failure, on_failure)
            finally:
                # The traceback holds this frame: without this, frame -> failure -> traceback ->
                # frame is a cycle, and the failed slot's tensors wait for the garbage collector.
                del failure
        stepped = self._apply(slots, loss, on_failure)
        return self._with_frames(stepped, on_failure)

    def _compile_failed(self, slots: list[Slot], exc: BaseException) -> bool:
        """Whether a compiled runner's failed pass failed because of torch.compile (no C compiler
        for Triton's launchers, an inductor bug): then, as that is no job's fault and would fail
        every job, the runner says so once and runs eager from now on. An error of dynamo, inductor
        or Triton in `exc`'s chain is compile's; so is any other error that the same pass run eager
        does not raise (a backward compiled lazily re-raises its backend's error bare, at the first
        `backward()`). Out of memory never is: that is the pass's size, for `_split`."""
        if not self.compiled or _out_of_memory(exc):
            return False
        if not any(type(link).__module__.startswith(("torch._dynamo", "torch._inductor", "triton"))
                   for link in _chain(exc)):
            noise = [s.generator.get_state() for s in slots]
            compiled = self._decode_soft, self._embed_cuts
            self._decode_soft, self._embed_cuts = self._eager
            try:
                self._gradients(slots)                    # a probe: its gradients are dropped below
            except Exception as again:  # noqa: BLE001 - the job's own error: bisected as usual
                traceback.clear_frames(again.__traceback__)
                self._decode_soft, self._embed_cuts = compiled
                return False
            finally:
                _undo_draws(slots, noise)
        cause = list(_chain(exc, contexts=False))[-1]    # dynamo's wrapper names only the backend
        log.warning("torch.compile failed (%s: %s); this worker runs its steps uncompiled from now on",
                    type(cause).__name__, (str(cause).strip().splitlines() or [""])[0])
        self._decode_soft, self._embed_cuts = self._eager
        self.compiled = False
        return True

    def _split(self, slots: list[Slot], exc: Exception, on_failure: Callable[[Slot, Exception], None]
               ) -> list[tuple[Slot, Frame | None]]:
        """Run a pass that failed again as two halves (or fail its one slot)."""
        out_of_memory = _out_of_memory(exc)
        if out_of_memory and any(g.replay is not None for g in self._graphs.values()):
            # Graphs hold their steps' memory: drop them and try the same pass again before
            # learning a smaller one from a shortage they made (once: no graph holds any now).
            self._drop_graphs()
            return self._step_pass(slots, on_failure)
        if out_of_memory and self.models.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(slots) == 1:
            self._fail(slots[0], exc, on_failure)
            return []
        half = len(slots) // 2
        if out_of_memory:
            key = batch_key(slots[0].settings)
            limit = min(self.pass_limit.get(key, len(slots)), half)
            if self.pass_limit.get(key) != limit:
                log.warning("out of memory at %d slots in one pass (grid %d, cutn %d): from now on "
                            "passes of at most %d; a smaller max_batch avoids the failed tries",
                            len(slots), slots[0].settings.grid, slots[0].settings.cutn, limit)
            self.pass_limit[key] = limit
        else:
            log.warning("a pass of %d slots failed (%s: %s); running it in halves to find the job "
                        "that fails", len(slots), type(exc).__name__, exc)
        return self._step_pass(slots[:half], on_failure) + self._step_pass(slots[half:], on_failure)

    def _fail(self, slot: Slot, exc: Exception, on_failure: Callable[[Slot, Exception], None]) -> None:
        self.remove(slot.key)
        on_failure(slot, exc)

    def _with_frames(self, slots: list[Slot], on_failure: Callable[[Slot, Exception], None] | None
                     ) -> list[tuple[Slot, Frame | None]]:
        """(slot, its frame if one is due) for each slot; a frame that cannot be taken with the
        others is taken alone, and a slot whose frame fails alone fails. A slot found non-finite
        at its frame (NonFiniteError: its own numbers, not the pass's) fails alone at once; the
        others' frames, taken with it, stand."""
        wanted = [s for s in slots if s.wants_frame()]
        frames: dict[Any, Frame] = {}
        if wanted:
            together = True
            try:
                taken = self._frames(wanted)
            except Exception as exc:  # noqa: BLE001 - one at a time, below
                if on_failure is None:
                    raise
                traceback.clear_frames(exc.__traceback__)
                together = False
            if together:
                for s, got in zip(wanted, taken):
                    if not isinstance(got, NonFiniteError):
                        frames[s.key] = got
                    elif on_failure is None:
                        raise got
                    else:
                        self._fail(s, got, on_failure)
            else:
                if self.models.device.type == "cuda":
                    torch.cuda.empty_cache()
                for s in wanted:
                    try:
                        frames[s.key] = self.frames([s])[0]
                    except Exception as exc:  # noqa: BLE001 - this job alone
                        self._fail(s, exc, on_failure)
        return [(s, frames.get(s.key)) for s in slots if s.key in self.slots or on_failure is None]

    def _gradients(self, slots: list[Slot]) -> torch.Tensor:
        """Forward and backward of one pass: every slot's loss [B] and the gradient on its logits.
        Changes nothing of a slot but its generator (this step's draws) and its `.grad`."""
        models, res = self.models, self.models.clip_resolution
        s0 = slots[0].settings
        if any(batch_key(s.settings) != batch_key(s0) for s in slots):
            raise ValueError("slots in one batch must share grid, cutn, precision, split_softmax and tau")
        cutn, device = s0.cutn, models.device
        # Each slot's noise from its own generator, in the order a solo run draws it.
        uniforms = torch.empty((len(slots),) + tuple(slots[0].logits.shape[1:]), device=device)
        params = []
        for i, s in enumerate(slots):
            uniforms[i:i + 1].uniform_(generator=s.generator)  # == torch.rand(shape, generator=...)
            params.append(cutout_params(cutn, res, s.settings, s.generator, device))
        grids, masks, noise = (torch.cat(p) for p in zip(*params))
        logits = torch.cat([s.logits for s in slots])  # [B, V, g, g]
        visual, decoder = self._towers(s0.precision)
        with _autocast(models, s0.precision):
            images = self._decode_soft(decoder, logits, uniforms, s0.tau, s0.split_softmax)  # [B, 3, 8g, 8g]
            del uniforms, logits
            cuts = apply_cutouts(images, cutn, grids, masks, noise)  # [B * cutn, 3, R, R]
            emb = self._embed_cuts(visual, cuts)  # [B * cutn, D]
        del images, cuts
        emb = emb.float().view(len(slots), cutn, -1)  # [B, cutn, D]
        losses = []
        for i, slot in enumerate(slots):
            sims = emb[i] @ slot.targets.embeddings.T  # [cutn, T]
            losses.append(-(sims.mean(dim=0) * slot.targets.weights).sum())
        loss = torch.stack(losses)  # [B]
        for s in slots:
            s.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        return loss.detach()

    def _apply(self, slots: list[Slot], loss: torch.Tensor,
               on_failure: Callable[[Slot, Exception], None] | None) -> list[Slot]:
        """Each slot's optimiser step on its gradient; returns the slots that stepped."""
        stepped = []
        for i, s in enumerate(slots):
            for group in s.optimizer.param_groups:
                set_lr(group, s.lr())  # a Python float, or a device fill: no sync
            try:
                s.adam_step()
            except Exception as exc:  # noqa: BLE001 - e.g. an optimiser state that does not fit: this job alone
                if on_failure is None:
                    raise
                self._fail(s, exc, on_failure)
                continue
            s.iteration += 1
            s.loss = loss[i]  # stays on the device until a frame reads it
            stepped.append(s)
        return stepped


GRAPH_WARMUP_STEPS = 2   # a slot's steps alone on a side stream before its capture
# A capture costs a device sync, an emptied allocator cache and a step's worth of Python: a slot
# gets a graph only with at least this many replays ahead.
GRAPH_MIN_REPLAYS = 10


class _SoloGraph:
    """A slot's captured step: its replay (None until captured) and the loss tensor it writes;
    `capture_at`: the slot's iteration at which it is captured (after its warm-up steps);
    `failed`: its capture ran out of memory (the slot steps eagerly while alone)."""

    def __init__(self, capture_at: int) -> None:
        self.capture_at = capture_at
        self.replay: Callable[[], None] | None = None
        self.loss: torch.Tensor | None = None
        self.failed = False

    def capture(self, runner: BatchRunner, slot: Slot) -> None:
        """Capture `slot`'s whole step (draws, forward, backward, Adam) with `runner`'s capture
        function. On CUDA a probe first: the step's forward and backward, undone, with any host
        sync an error (a sync inside a capture breaks it, and before torch 2.13 a broken capture
        leaves CUDA's generators and allocator in capture mode for good). On failure the slot is as
        it was: its draws put back (into a new generator: a failed capture may leave the old one
        in capture mode), no gradient left."""
        loss = torch.zeros(1, device=slot.logits.device)   # [1]: the graph's loss, made outside it

        def step() -> None:
            loss.copy_(runner._gradients([slot]))
            slot.adam_step()

        assert runner._capture is not None
        noise = slot.generator.get_state()
        try:
            if slot.logits.device.type == "cuda":
                before = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    runner._gradients([slot])
                finally:
                    torch.cuda.set_sync_debug_mode(before)
                    _undo_draws([slot], [noise])
            slot.optimizer.zero_grad(set_to_none=True)     # backward makes `.grad` in the graph's memory
            self.replay = runner._capture(step, slot.generator)
        except BaseException:
            slot.generator = torch.Generator(device=slot.generator.device)
            _undo_draws([slot], [noise])
            raise
        self.loss = loss


# --- the one-job loop --------------------------------------------------------------------------


@dataclass
class GenerationResult:
    frames: list[Frame]
    final: Frame
    state: dict[str, Any]            # Slot.state(): the final logits etc. (continue / remix)
    cancelled: bool
    warnings: list[str]
    seconds: float


def generate(
    prompt: str | Sequence[PromptPart],
    settings: GenerationSettings,
    models: Models,
    cancel: CancelToken | None = None,
    progress: ProgressCallback | None = None,
    init_logits: torch.Tensor | None = None,
    checkpoint: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    image_targets: Sequence[tuple[torch.Tensor, float, str]] = (),
    on_step: StepCallback | None = None,
    cuda_graphs: bool | Capture = False,
    keep_frames: bool = True,
) -> GenerationResult:
    """Run one job to the end (or until `cancel.is_set()`, checked every iteration).

    `progress` sees every frame: iteration 0, every `frame_every`, and the last. `on_checkpoint`
    gets the slot's state at every frame after 0, for resuming after a crash (`checkpoint=`).
    `on_step(iteration)` is called after every step, with the iterations now done (a Python int:
    1, 2, ..., `iterations`; from the checkpoint's on when resuming), before that iteration's frame
    if one is due: a progress bar that moves between frames. It reads nothing from the device (no
    host sync), so on a GPU it says the step was queued, which may run a few steps ahead of the
    device; frames, which wait for the device, keep it honest.

    `cuda_graphs`: on CUDA, the job's step is replayed from a CUDA graph after a short warm-up
    (`BatchRunner(cuda_graphs=True)`: a job alone is the case graphs are for); ignored on a CPU.

    `keep_frames=False`: the result's `frames` holds the last frame only (a caller that keeps
    them itself as they come, through `progress`: a long run's frames need not all be in memory).
    """
    targets = encode_targets(models, prompt, image_targets)
    started = time.perf_counter()
    runner = BatchRunner(models, cuda_graphs=cuda_graphs)
    slot = runner.add(Slot("job", models, targets, settings, init_logits, checkpoint))
    frames: list[Frame] = []

    def emit(frame: Frame) -> None:
        if keep_frames or not frames:
            frames.append(frame)
        else:
            frames[0] = frame
        if progress is not None:
            progress(frame)

    emit(runner.frames([slot])[0])  # the start: iteration 0, or where the checkpoint left off
    cancelled = False
    while not slot.done:
        if cancel is not None and cancel.is_set():
            cancelled = True
            if slot.iteration != frames[-1].iteration:   # the result's frame is its state's picture
                emit(runner.frames([slot])[0])
            break
        (_, frame), = runner.step()
        if on_step is not None:
            on_step(slot.iteration)       # a Python int: no host sync
        if frame is not None:
            emit(frame)
            if on_checkpoint is not None and not slot.done:
                on_checkpoint(slot.state())
    return GenerationResult(
        frames=frames, final=frames[-1], state=slot.state(), cancelled=cancelled,
        warnings=targets.warnings, seconds=time.perf_counter() - started,
    )


__all__ = [
    "BatchRunner", "Frame", "GenerationResult", "GenerationSettings", "NonFiniteError", "PromptError", "PromptPart",
    "Slot", "Targets", "batch_key", "check_state", "compact_state", "encode_targets", "expand_state", "generate",
    "parse_prompt", "state_from_bytes", "state_is_finite", "state_to_bytes",
]
