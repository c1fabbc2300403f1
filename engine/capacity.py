"""How many jobs fit in one batch: `choose_max_batch` from free GPU memory and a per-slot estimate.

The per-slot estimate is analytic: it adds up the tensors one slot (one job) keeps alive during a
`BatchRunner` step, from the architecture's sizes alone, so it needs no GPU to compute:

1. the logits and their optimiser: the parameter, its gradient and Adam's two moments, all fp32
   [8192, g, g]; and per step the batch's copy of the logits (`torch.cat`), the soft codes the
   softmax saves (fp32), the decoder's input copy under autocast, and two gradients of that size
   in the backward pass;
2. the decoder's saved activations: every ReLU output, plus every convolution's input where it is
   not the same tensor (the 1x1 `id_path` convs, and on CUDA the copies that `dall_e`'s own fp16
   casts make before autocast casts again to bf16);
3. the picture and the cut-outs: the sigmoid output and the clamp's input [3, 8g, 8g], the
   `cutn` copies `grid_sample` reads and its sampling grids, the masks, CLIP's patch-conv input;
4. CLIP's image transformer for `cutn` cut-outs: per layer and token, the packed q/k/v and the
   attention output (saved by scaled-dot-product attention), the two LayerNorm inputs (fp32: CLIP's
   LayerNorm casts up), the MLP's pre-activation and sigmoid (QuickGELU). Linear layers save no
   input: their weights are frozen, so autograd does not need it;
5. transients of the backward pass: a few gradient buffers the size of the largest activation map;

all times `SAFETY` (allocator rounding and fragmentation, cuDNN workspaces). On fp32 (the CPU) the
saved-activation part matches what autograd saves exactly (tests/test_batching.py measures it with
`saved_tensor_bytes`); the CUDA figures (bf16 autocast) are to be checked against
`torch.cuda.max_memory_allocated` by benchmarks/gpu_check.sh.

Full-size models (ViT-B/32 + OpenAI's decoder), cutn 12, bf16 on CUDA: about 1.7 GiB a slot at
grid 32 (256x256) and 6.0 GiB at grid 64 (512x512); fp32 2.2 and 7.5 GiB. `python -m
engine.capacity` prints the table. (bf16 saves less than half: the fp32 logits and Adam state do
not shrink, and dall_e's own fp16 casts make every decoder conv keep a second copy of its input.)

The estimate knows CLIP's vision transformers (ViT-*) only. With a ResNet CLIP (RN50, RN101, ...),
`choose_max_batch(models=...)` answers 1 and logs a WARNING saying why: set the batch size explicitly
(`max_batch` in the bot's [worker] table, `imagine-worker --max-batch`) to run more jobs at once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

GiB = 1 << 30
SAFETY = 1.25                 # allocator rounding, fragmentation, workspaces
RESERVE_BYTES = 2 * GiB       # left free: CUDA context growth, the frame pass, other processes
RESERVE_FRACTION = 0.05       # ... and this share of what is free
DEFAULT_CAP = 32              # beyond this a job's own frame rate suffers more than throughput gains
BACKWARD_TRANSIENTS = 3       # gradient buffers of the largest activation alive at once


@dataclass(frozen=True)
class DecoderDims:
    vocab_size: int = 8192
    n_init: int = 128
    n_hid: int = 256
    n_blk_per_group: int = 2
    output_channels: int = 3

    @classmethod
    def of(cls, decoder: Any) -> "DecoderDims":
        return cls(int(decoder.vocab_size), int(decoder.n_init), int(decoder.n_hid),
                   int(decoder.n_blk_per_group), int(decoder.output_channels))


class UnknownArchitecture(ValueError):
    """The per-slot estimate does not know this model (e.g. a ResNet CLIP)."""


@dataclass(frozen=True)
class ClipVisualDims:
    resolution: int = 224
    patch: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: int = 512

    @property
    def tokens(self) -> int:
        return (self.resolution // self.patch) ** 2 + 1

    @classmethod
    def of(cls, clip_model: Any) -> "ClipVisualDims":
        v = clip_model.visual
        if not hasattr(v, "transformer"):
            kind = type(v).__name__
            raise UnknownArchitecture(f"the memory estimate knows CLIP's vision transformers (ViT), "
                                      f"not this CLIP's {kind} visual (a ResNet CLIP such as RN50)")
        blocks = v.transformer.resblocks
        return cls(int(v.input_resolution), int(v.conv1.kernel_size[0]), int(v.conv1.out_channels),
                   len(blocks), int(blocks[0].attn.num_heads), int(v.output_dim))


FULL_DECODER = DecoderDims()
VIT_B_32 = ClipVisualDims()


def effective_precision(device: torch.device | str, precision: str) -> str:
    """What a step really runs in: fp32 on the CPU (autocast is CUDA-only here); auto -> bf16."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if precision == "auto" else precision


def _decoder_layers(d: DecoderDims) -> Iterator[tuple[int, int, int, bool]]:
    """(group, n_in, n_out, has_id_conv) of each residual block; group g runs at (2**(g-1) * grid)^2."""
    widths = [d.n_init, 8 * d.n_hid, 4 * d.n_hid, 2 * d.n_hid, d.n_hid]
    for group in range(1, 5):
        for i in range(d.n_blk_per_group):
            n_in = widths[group - 1] if i == 0 else widths[group]
            n_out = widths[group]
            yield group, n_in, n_out, n_in != n_out


def saved_bytes(
    grid: int, cutn: int, precision: str = "fp32", decoder: DecoderDims = FULL_DECODER,
    clip_dims: ClipVisualDims = VIT_B_32, decoder_half_casts: bool = True,
) -> dict[str, int]:
    """Bytes autograd saves for one slot's step, by part. `precision` is the effective one
    (fp32 | bf16 | fp16). `decoder_half_casts`: dall_e's Conv2d casts to fp16 on CUDA by itself
    (OpenAI's default), so under bf16 autocast each conv saves a second, bf16 copy of its input."""
    p1 = grid * grid
    vg = decoder.vocab_size * p1
    half = precision in ("bf16", "fp16")
    act = 2 if half else 4                        # decoder / CLIP activations under autocast
    copies = half and precision == "bf16" and decoder_half_casts

    parts: dict[str, int] = {}
    # The soft codes (softmax output, fp32) and, under autocast, the input conv's half copy.
    parts["soft_codes"] = vg * 4 + (vg * 2 if half else 0)

    elems = 0        # decoder elements saved at `act` bytes (ReLU outputs, id-conv inputs)
    copy_elems = 0   # extra conv-input copies (dall_e fp16 cast + bf16 autocast)
    for group, n_in, n_out, has_id in _decoder_layers(decoder):
        pos = p1 * 4 ** (group - 1)
        hid = n_out // 4
        elems += pos * (n_in + 3 * hid + (n_in if has_id else 0))   # relu_1..4 outputs; id conv input
        copy_elems += pos * (n_in + 3 * hid)                          # conv_1..4 inputs
    out_pos = p1 * 64
    elems += out_pos * decoder.n_hid                                  # output relu
    copy_elems += out_pos * decoder.n_hid                             # output conv input
    parts["decoder"] = elems * act + (copy_elems * 2 if copies else 0)

    res, c = clip_dims.resolution, decoder.output_channels
    parts["picture"] = (
        2 * c * out_pos * 4                       # sigmoid output, clamp input
        + cutn * 3 * out_pos * 4                  # grid_sample's source: the picture, cutn times
        + cutn * res * res * 2 * 4                # grid_sample's sampling grids
        + cutn * res * res * 4                    # the rotation masks
        + cutn * 3 * res * res * (2 if half else 4)   # CLIP's patch conv input
    )

    w, t, h = clip_dims.width, clip_dims.tokens, clip_dims.heads
    per_token = (
        3 * w * act + w * act + h * 4             # packed q/k/v, attention output, logsumexp
        + 2 * w * 4 + 4 * 4                       # LayerNorm inputs (fp32) and mean/rstd
        + 2 * 4 * w * act                         # QuickGELU: pre-activation and sigmoid
    )
    parts["clip"] = cutn * (
        clip_dims.layers * t * per_token
        + t * w * 4 + t * 8                       # ln_pre input, mean/rstd
        + (t if not half else 1) * w * 4          # ln_post input (fp32 mode saves the whole storage)
        + 4 * clip_dims.output_dim * 4            # normalize
    )
    return parts


def per_slot_bytes(
    grid: int, cutn: int = 12, precision: str = "bf16", decoder: DecoderDims = FULL_DECODER,
    clip_dims: ClipVisualDims = VIT_B_32, decoder_half_casts: bool = True, safety: float = SAFETY,
) -> int:
    """Peak bytes one more slot adds to a batch (see the module docstring for what is counted)."""
    vg = decoder.vocab_size * grid * grid
    saved = sum(saved_bytes(grid, cutn, precision, decoder, clip_dims, decoder_half_casts).values())
    persistent = 4 * vg * 4                         # logits, grad, Adam exp_avg, exp_avg_sq
    batch_copies = 2 * vg * 4                       # the batch's cat of the logits; a gradient
    half = precision in ("bf16", "fp16")
    widest = max(max(n_in, n_out) * grid * grid * 4 ** (group - 1)
                 for group, n_in, n_out, _ in _decoder_layers(decoder))
    transient = BACKWARD_TRANSIENTS * widest * (2 if half else 4) + vg * 4   # + the softmax's grad
    return int((saved + persistent + batch_copies + transient) * safety)


def free_device_bytes(device: torch.device | str) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def choose_max_batch(
    device: torch.device | str,
    grid: int,
    free_bytes: int | None = None,
    per_slot_bytes: int | None = None,
    *,
    cutn: int = 12,
    precision: str = "auto",
    models: Any = None,
    cap: int = DEFAULT_CAP,
    reserve_bytes: int = RESERVE_BYTES,
) -> int:
    """The most slots of `grid` that fit: (free - reserve) // per-slot estimate, at least 1.

    Call it after the models are loaded (their weights are then no longer free memory; the
    runner's low-precision copies of them, `low_precision_copy_bytes`, are counted here). On CUDA
    `free_bytes` defaults to `torch.cuda.mem_get_info`; elsewhere the answer is 1 unless
    `free_bytes` is given. `per_slot_bytes` overrides the analytic estimate (e.g. a measured one);
    `models` (an engine.models.Models) gives the architecture's sizes, else full-size ones. Models
    the estimate does not know (a ResNet CLIP) give 1, with a WARNING naming why."""
    device = torch.device(device)
    if free_bytes is None:
        free_bytes = free_device_bytes(device)
        if free_bytes is None:
            return 1
    if per_slot_bytes is None:
        try:
            per_slot_bytes = _estimate_for(device, grid, cutn, precision, models)
        except UnknownArchitecture as exc:
            log.warning("max_batch 1: %s, so it cannot tell how many jobs fit in GPU memory; "
                        "set max_batch (imagine-worker --max-batch) to run more at once", exc)
            return 1
    usable = free_bytes * (1 - RESERVE_FRACTION) - reserve_bytes - low_precision_copy_bytes(device, precision, models)
    return int(max(1, min(cap, usable // max(per_slot_bytes, 1))))


# Parameters of full-size CLIP ViT-B/32's image tower and OpenAI's decoder (random_models' copies).
FULL_SIZE_TOWER_PARAMS = 87_849_216 + 43_829_766


def low_precision_copy_bytes(device: torch.device | str, precision: str = "auto", models: Any = None) -> int:
    """The memory of the low-precision copies of CLIP's image tower and the decoder that a
    BatchRunner steps under bf16/fp16 autocast (`Models.low_precision`, made when the first such
    job joins, once per models and dtype; about 263 MB at full size): 2 bytes a parameter on
    CUDA under bf16/fp16, nothing elsewhere. Full-size models' unless `models` are given. Without
    the copies, autocast's casts of the same weights took as much in every pass (saved for the
    backward pass), uncounted: the copies stay, so they are counted."""
    if effective_precision(device, precision) not in ("bf16", "fp16"):
        return 0
    if models is None:
        return 2 * FULL_SIZE_TOWER_PARAMS
    return 2 * sum(p.numel() for part in (models.clip.visual, models.decoder) for p in part.parameters())


# the function's parameter shadows the module-level function inside choose_max_batch
_per_slot_bytes = per_slot_bytes


def _estimate_for(device: torch.device, grid: int, cutn: int, precision: str, models: Any) -> int:
    eff = effective_precision(device, precision)
    if models is None:
        return _per_slot_bytes(grid, cutn, eff)
    half_casts = device.type == "cuda" and any(
        getattr(m, "use_float16", False) for m in models.decoder.modules()
    )
    return _per_slot_bytes(grid, cutn, eff, DecoderDims.of(models.decoder), ClipVisualDims.of(models.clip),
                           decoder_half_casts=half_casts)


@contextlib.contextmanager
def saved_tensor_bytes(*modules: torch.nn.Module) -> Iterator[dict[int, int]]:
    """Record the storages autograd saves inside the block (each counted once, the modules'
    weights left out): {storage pointer: bytes}. Device-independent, so it checks the estimate
    on the CPU."""
    weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def main() -> None:
    print("per-slot estimate, full-size models (ViT-B/32 + OpenAI's decoder), cutn 12")
    for precision in ("fp32", "bf16"):
        for grid in (32, 64):
            parts = saved_bytes(grid, 12, precision)
            total = per_slot_bytes(grid, 12, precision)
            detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items())
            print(f"  {precision} grid {grid}: {total / GiB:.2f} GiB  (saved: {detail} GiB)")
    for free in (80 * GiB, 141 * GiB):
        print(f"  max_batch with {free / GiB:.0f} GiB free: grid 32 -> "
              f"{choose_max_batch('cuda', 32, free_bytes=free)}, grid 64 -> {choose_max_batch('cuda', 64, free_bytes=free)}")


if __name__ == "__main__":
    main()
