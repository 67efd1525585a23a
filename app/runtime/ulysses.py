"""Z-Image's attention under two-rank Ulysses context parallelism, with the exchanges overlapped
with the projections instead of waited for one after another.

diffusers' Ulysses (TemplatedUlyssesAttention) takes q, k and v finished, all-to-alls them and
waits, attends, all-to-alls the result back and waits. Under torch.compile a functional collective
is waited for right where it is issued, so nothing computes while it travels: on two H200s NCCL's
kernels took 8 of a 56 ms step, none of it under compute (docs/PERFORMANCE.md). Here each half
leaves as soon as it exists, and is waited for only where it is read:

    v, the other rank's heads → send │ q → norm → RoPE → send the other rank's heads │ k → likewise │
    v, this rank's heads (computed while the sends fly) │ wait │ attention │ send the other rank's
    tokens │ this rank's tokens through its part of the output projection (meanwhile) │ wait │
    the received heads through the rest of it

With two ranks, each sends the other exactly the half it needs (an all-to-all with nothing sent
to itself), so nothing is permuted or copied into a send buffer but that half. The products are
the same over the same numbers: a projection split by output rows is exact, and the output
projection split by input columns adds two halves (bf16 rounding in another place, within the
noise the tests allow). Layouts follow diffusers' Ulysses (rank w attends over heads
[w·H/2, (w+1)·H/2), rank 0's tokens first), so either processor gives the same image.

The collectives are the raw _c10d_functional ops, issued and waited for explicitly, so the compiled
graph keeps them where they are written (funcol's wrappers wait at once while tracing)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _swap(t: torch.Tensor, rank: int, group_name: str) -> torch.Tensor:
    """Start sending t to the other rank of two, which sends its own t back. Read the result only
    through _received()."""
    splits = [0, 1] if rank == 0 else [1, 0]  # rows to / from each rank: none to or from itself
    return torch.ops._c10d_functional.all_to_all_single(
        t.contiguous().reshape(1, -1), splits, splits, group_name
    )


def _received(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(raw).view(like.shape)


def _splittable(linear: nn.Module) -> bool:
    """Whether _rows can compute some of this layer's output features alone."""
    from app.runtime.fp8 import Float8Linear

    return type(linear) is nn.Linear or isinstance(linear, Float8Linear)


def _rows(linear: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """linear(x)[..., start:stop], computed alone (only those output features)."""
    if type(linear) is nn.Linear:
        return F.linear(
            x, linear.weight[start:stop], None if linear.bias is None else linear.bias[start:stop]
        )
    return linear(x, rows=(start, stop))  # Float8Linear


# Copied from diffusers 0.42.1 diffusers/models/transformers/transformer_z_image.py ZSingleStreamAttnProcessor.__call__ sha256:f8f65d350a617957  # noqa: E501
# (its apply_rotary_emb; the rest of that __call__ is what OverlappedUlyssesProcessor reorders)
def _apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.unsqueeze(2)
        x_out = torch.view_as_real(x * freqs_cis).flatten(3)
        return x_out.type_as(x_in)  # todo


class OverlappedUlyssesProcessor:
    """The attention processor of one split Z-Image block (a main layer or a noise-refiner layer)
    on one of two ranks."""

    _attention_backend = None  # diffusers' set_attention_backend writes here
    _parallel_config = None  # (not diffusers' Ulysses: this processor makes its own exchanges)

    def __init__(self, group_name: str, rank: int):
        self.group_name, self.rank = group_name, rank

    def _in_rank_order(self, mine: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([mine, theirs] if self.rank == 0 else [theirs, mine], dim=dim)

    def _exchange_heads(self, t: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, S_local, H, D) → (this rank's heads of its tokens, the other rank's heads on their way)."""
        r = self.rank
        mine = t[:, :, r * half : (r + 1) * half]
        theirs = t[:, :, (1 - r) * half : (2 - r) * half]
        return mine, _swap(theirs, r, self.group_name)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        freqs_cis: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        r, heads, x = self.rank, attn.heads, hidden_states
        half = heads // 2
        head_dim = attn.to_q.out_features // heads if hasattr(attn.to_q, "out_features") else None

        # v first: where the layer can compute output rows alone, the other rank's heads are
        # computed and sent before this rank's own, which are computed while they travel.
        v_split = head_dim is not None and _splittable(attn.to_v)
        if v_split:
            their_rows = ((1 - r) * half * head_dim, (2 - r) * half * head_dim)
            v_sent = _swap(
                _rows(attn.to_v, x, *their_rows).unflatten(-1, (half, head_dim)), r, self.group_name
            )
        else:
            v_mine, v_sent = self._exchange_heads(attn.to_v(x).unflatten(-1, (heads, -1)), half)

        query = attn.to_q(x).unflatten(-1, (heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if freqs_cis is not None:
            query = _apply_rotary_emb(query, freqs_cis)
        q_mine, q_sent = self._exchange_heads(query, half)

        key = attn.to_k(x).unflatten(-1, (heads, -1))
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            key = _apply_rotary_emb(key, freqs_cis)
        k_mine, k_sent = self._exchange_heads(key, half)

        if v_split:
            own_rows = (r * half * head_dim, (r + 1) * half * head_dim)
            v_mine = _rows(attn.to_v, x, *own_rows).unflatten(-1, (half, head_dim))
        value = self._in_rank_order(v_mine, _received(v_sent, v_mine), dim=1)
        query = self._in_rank_order(q_mine, _received(q_sent, q_mine), dim=1)
        key = self._in_rank_order(k_mine, _received(k_sent, k_mine), dim=1)

        if attention_mask is not None and attention_mask.ndim == 2:  # the whole sequence's mask
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend
        )
        return self._project_out(attn, out.to(x.dtype), x.shape[1])

    def _project_out(self, attn, out: torch.Tensor, s: int) -> torch.Tensor:
        """out (B, 2·S_local, H/2, D), this rank's heads over every token → every head of this
        rank's tokens, through the output projection."""
        r = self.rank
        mine = out[:, r * s : (r + 1) * s]  # this rank's tokens: they stay
        sent = _swap(out[:, (1 - r) * s : (2 - r) * s], r, self.group_name)  # the other rank's
        to_out = attn.to_out[0]
        if type(to_out) is nn.Linear:  # this rank's heads' share of the product while the rest travels
            width = mine.shape[2] * mine.shape[3]
            own_cols, their_cols = (r * width, (r + 1) * width), ((1 - r) * width, (2 - r) * width)
            result = F.linear(mine.flatten(2, 3), to_out.weight[:, own_cols[0] : own_cols[1]])
            theirs = _received(sent, mine).flatten(2, 3)
            result = result + F.linear(theirs, to_out.weight[:, their_cols[0] : their_cols[1]])
            if to_out.bias is not None:
                result = result + to_out.bias
        else:
            whole = self._in_rank_order(mine, _received(sent, mine), dim=2)  # (B, S_local, H, D)
            result = to_out(whole.flatten(2, 3))
        if len(attn.to_out) > 1:  # dropout (identity in inference)
            result = attn.to_out[1](result)
        return result
