"""The engine's CLIP runs its image tower's attention in fewer ops (engine.attention) and, under
autocast on a GPU, from low-precision copies of its weights (engine.models.low_precision_copy):
both must give the same numbers as the models they stand for."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from engine import models as engine_models
from engine import random_models
from engine.attention import SelfAttention, lean_attention, stock_attention
from engine import generate as generate_module
from engine.generate import BatchRunner, GenerationSettings, encode_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_loop import ReferenceLoop  # noqa: E402

# More than one head (the tests' tiny CLIP has one, which would hide a wrong head layout).
TWO_HEAD_CLIP = random_models.ClipShape(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
                                        vision_patch_size=8)


def aten_calls(run) -> int:
    """ATen calls (nested ones counted) that `run()` makes: what the host dispatches."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def random_attention(width: int = 64, heads: int = 4) -> nn.MultiheadAttention:
    """Every parameter random, biases too (their own init leaves the biases 0, which would hide
    a wrong split of the packed bias into q, k and v)."""
    attention = nn.MultiheadAttention(width, heads).requires_grad_(False)
    for p in attention.parameters():
        nn.init.normal_(p, std=0.2)
    return attention


def forward_backward(attention: nn.MultiheadAttention, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(True)
    out, weights = attention(x, x, x, **kwargs)
    out.square().sum().backward()
    return out.detach(), x.grad, weights


def test_self_attention_gives_the_base_class_numbers_to_the_last_bit():
    torch.manual_seed(0)
    stock = random_attention()
    lean = copy.deepcopy(stock)
    assert lean_attention(lean) == 1 and type(lean) is SelfAttention
    assert list(lean.state_dict()) == list(stock.state_dict())
    x = torch.randn(7, 3, 64)  # [L, N, E]
    for mode in (stock.train, stock.eval):
        mode()
        lean.train(stock.training)
        out, grad, weights = forward_backward(lean, x, need_weights=False)
        want_out, want_grad, _ = forward_backward(stock, x, need_weights=False)
        assert weights is None
        assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
    # Any other call is the base class's: weights asked for, a mask (CLIP's text tower).
    out, grad, weights = forward_backward(lean, x, need_weights=True)
    want = forward_backward(stock, x, need_weights=True)
    assert torch.equal(out, want[0]) and torch.equal(weights, want[2])
    mask = torch.full((7, 7), float("-inf")).triu(1)
    assert torch.equal(forward_backward(lean, x, need_weights=False, attn_mask=mask)[0],
                       forward_backward(stock, x, need_weights=False, attn_mask=mask)[0])


def test_self_attention_makes_fewer_calls_a_step():
    torch.manual_seed(0)
    stock = random_attention()
    lean = copy.deepcopy(stock)
    lean_attention(lean)
    x = torch.randn(7, 3, 64)
    stock_calls = aten_calls(lambda: forward_backward(stock, x, need_weights=False))
    lean_calls = aten_calls(lambda: forward_backward(lean, x, need_weights=False))
    assert lean_calls <= 0.75 * stock_calls, (lean_calls, stock_calls)
    assert stock_attention(lean) == 1 and aten_calls(lambda: forward_backward(lean, x, need_weights=False)) == stock_calls


def test_clip_loaded_through_the_engine_has_lean_attention_in_its_image_tower_only(tmp_path):
    stock = random_models.make_clip(TWO_HEAD_CLIP, seed=3).float().eval().requires_grad_(False)
    path = random_models.save_clip_torchscript(stock, tmp_path / "clip.pt")
    loaded = engine_models.load_clip(str(path), "cpu", cache_dir=tmp_path / "cache", trust=True)   # made here
    kinds = [type(m) for m in loaded.modules() if isinstance(m, nn.MultiheadAttention)]
    assert kinds == [SelfAttention] * 2 + [nn.MultiheadAttention]       # the text tower keeps its mask path
    assert loaded.state_dict().keys() == stock.state_dict().keys()
    # Against the same weights with the stock attention (loading rounds them through fp16, as
    # OpenAI's build_model does).
    stock = copy.deepcopy(loaded)
    assert stock_attention(stock) == 2
    images = torch.rand(5, 3, 32, 32, requires_grad=True)
    out = loaded.encode_image(images)
    out.square().sum().backward()
    grad, images.grad = images.grad, None
    want = stock.encode_image(images)
    want.square().sum().backward()
    assert torch.equal(out, want) and torch.equal(grad, images.grad)


def test_the_benchmarks_reference_loop_keeps_the_notebooks_attention(tiny_models):
    assert any(isinstance(m, SelfAttention) for m in tiny_models.clip.modules())
    settings = GenerationSettings(grid=8, cutn=2, iterations=1)
    ref = ReferenceLoop(tiny_models, encode_targets(tiny_models, "a house"), settings, precision="fp32")
    assert not any(isinstance(m, SelfAttention) for m in ref.visual.modules())
    assert any(isinstance(m, SelfAttention) for m in tiny_models.clip.modules())   # the engine's untouched


def test_a_low_precision_copy_gives_autocasts_numbers_without_casting_its_weights(tiny_models):
    torch.manual_seed(0)
    clip_model = random_models.make_clip(TWO_HEAD_CLIP, seed=1)
    engine_models.prepare_clip(clip_model)
    decoder = tiny_models.decoder
    for original, x in ((clip_model.visual, torch.rand(4, 3, 32, 32)),
                        (decoder, torch.softmax(torch.randn(2, decoder.vocab_size, 8, 8), dim=1))):
        low = engine_models.low_precision_copy(original, torch.bfloat16)
        dtypes = {name: p.dtype for name, p in low.named_parameters()}
        assert torch.bfloat16 in dtypes.values()
        # LayerNorm and the embeddings stay fp32, as in clip's convert_weights; the original is untouched.
        assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "ln_" in name or "embedding" in name)
        assert all(p.dtype == torch.float32 for p in original.parameters())
        casts = {}
        for name, model in (("original", original), ("copy", low)):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                x_in = x.clone().requires_grad_(True)
                out = model(x_in)
                casts[name] = aten_calls(lambda: model(x))
            out.float().square().sum().backward()
            if name == "original":
                want_out, want_grad = out, x_in.grad
        assert out.dtype == want_out.dtype
        assert torch.equal(out, want_out) and torch.equal(x_in.grad, want_grad)
        assert casts["copy"] < casts["original"]      # the weights' casts are gone
    # A decoder that casts to fp16 by itself (dall_e's default on CUDA; the benchmarks can keep it):
    # autocast never sees its weights, so they stay as they are.
    own_casts = copy.deepcopy(decoder)
    for sub in own_casts.modules():
        if hasattr(sub, "use_float16"):
            sub.use_float16 = True
    assert all(p.dtype == torch.float32 for p in engine_models.low_precision_copy(own_casts, torch.bfloat16).parameters())


def test_the_runner_steps_shared_low_precision_copies_with_autocasts_numbers(tiny_models, monkeypatch):
    """On CUDA a bf16 job steps from the models' bf16 copies (`BatchRunner(precast=True)`). A CPU
    runs no autocast, so here CPU autocast stands in for CUDA's: the runner's own code, with the
    copies against autocast casting the fp32 weights, gives the same logits to the last bit."""
    from tests.test_batching import make_slot

    monkeypatch.setattr(generate_module, "_autocast_dtype", lambda models, precision: torch.bfloat16)
    monkeypatch.setattr(generate_module, "_autocast",
                        lambda models, precision: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False))
    visual, decoder = tiny_models.low_precision(torch.bfloat16)
    calls = {True: [], False: []}
    precast_now = [True]
    hooks = [part.register_forward_hook(lambda *_: calls[precast_now[0]].append(1)) for part in (visual, decoder)]
    logits, runners = {}, {}
    try:
        for precast in (True, False):
            precast_now[0] = precast
            runner = runners[precast] = BatchRunner(tiny_models, precast=precast)
            slots = [runner.add(make_slot(tiny_models, key)) for key in ("a", "b")]
            start = [s.logits.detach().clone() for s in slots]
            for _ in range(3):
                runner.step()
            logits[precast] = [s.logits.detach().clone() for s in slots]
            assert not any(torch.equal(a, b) for a, b in zip(start, logits[precast]))   # they stepped
    finally:
        for hook in hooks:      # the models are the session's
            hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(logits[True], logits[False]))
    assert len(calls[True]) == 2 * 3 and not calls[False]     # the passes ran the copies (each step: both)
    assert runners[True]._towers("bf16") == (visual, decoder)                      # one set, shared
    assert BatchRunner(tiny_models)._towers("bf16")[0] is visual
    assert visual.conv1.weight.dtype == torch.bfloat16 and visual is not tiny_models.clip.visual
    assert runners[False]._towers("bf16") == (tiny_models.clip.visual, tiny_models.decoder)
