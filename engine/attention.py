"""CLIP's image-tower attention in fewer ops: the same numbers, less work for the host per step.

A step of one job on a GPU is bound by launching ops, not by arithmetic (docs/PERFORMANCE.md):
the device waits while Python and the dispatcher queue several thousand ATen calls. In training
mode (the cut-outs require grad) `nn.MultiheadAttention` takes its general path,
`F.multi_head_attention_forward`: about fifty ATen calls a layer, forward and backward, most of
them checks, reshapes and transposes around one `scaled_dot_product_attention`. CLIP's image tower
only ever asks for plain self-attention (no masks, no weights back, sequence-first), which is one
in-projection, one attention and one out-projection: `SelfAttention` runs that case so, and any
other call the general way. The parameters, their names and the results are unchanged (equal to
the last bit on a CPU: tests/test_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` with a short path for unmasked self-attention of a batch
    (`attn(x, x, x, need_weights=False)`, x [L, N, E]); every other call as the base class."""

    def forward(  # type: ignore[override]
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not (query is key and key is value and query.dim() == 3 and not need_weights
                and key_padding_mask is None and attn_mask is None and not is_causal
                and not self.batch_first and self._qkv_same_embed_dim
                and self.bias_k is None and not self.add_zero_attn
                and (self.dropout == 0.0 or not self.training)):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        length, batch, width = query.shape                                     # [L, N, E]
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)          # [L, N, 3E]
        # The base class's layout: q, k, v are the thirds of 3E, each E split into heads.
        q, k, v = qkv.view(length, batch, 3, heads, width // heads).permute(2, 1, 3, 0, 4).unbind(0)  # [N, h, L, E/h]
        out = F.scaled_dot_product_attention(q, k, v)                         # [N, h, L, E/h]
        out = out.permute(2, 0, 1, 3).reshape(length, batch, width)            # [L, N, E]
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None


def lean_attention(module: nn.Module) -> int:
    """Make every plain `nn.MultiheadAttention` under `module` a `SelfAttention`, in place (the
    same object, parameters and state dict keys); returns how many. Idempotent."""
    changed = 0
    for sub in module.modules():
        if type(sub) is nn.MultiheadAttention:
            sub.__class__ = SelfAttention
            changed += 1
    return changed


def stock_attention(module: nn.Module) -> int:
    """Undo `lean_attention` in place (the benchmark's reference loop runs the notebook's CLIP)."""
    changed = 0
    for sub in module.modules():
        if type(sub) is SelfAttention:
            sub.__class__ = nn.MultiheadAttention
            changed += 1
    return changed
