"""A global attention mask (data-informed attention pruning, Rugina et al. 2020) attached to one attention module.

:class:`GlobalAttentionMask` holds the keep mask ``(heads, N, N)`` of one layer (True = the entry is computed),
indexed by *positions*: token index within the sentence counted from its first real token, the convention of the
pattern files (:mod:`fluence_fairseq.pruning.patterns`). The attention base turns batch indices into positions
(left-padded sources are shifted by their padding; decoding queries sit at their step) and asks for
:meth:`GlobalAttentionMask.rows` (one mask per batch row) or, when every row is aligned the same way,
:meth:`GlobalAttentionMask.shared` (one mask for the batch, what the block-sparse kernel needs).

Entries the patterns say nothing about (positions at or beyond the collected length ``N``) are kept: there is no
evidence to prune them. Pruning never silently turns off: a module with a mask always applies it
(:class:`PrunableAttentionMixin`, part of every attention, routes each call of its math through the mask).
"""
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

#: block-sparse layouts kept per mask (one per (query start, lengths, causal) seen; translation batches repeat them)
_LAYOUT_CACHE_SIZE = 64


class GlobalAttentionMask(nn.Module):
    """The keep mask of one attention layer.

    Args:
        keep: bool (heads, N, N), ``keep[h, i, j]`` = query position ``i`` of head ``h`` may attend key position ``j``.
        block: block size of the block-sparse kernel (softmax attention); rows and columns of ``block`` positions
            are kept as a block when any of their entries is kept, and masked inside exactly.
        label: where the mask comes from (for ``repr`` and errors), e.g. ``"self-enc layer 2"``.
    """

    def __init__(self, keep: Tensor, block: int = 32, label: str = ""):
        super().__init__()
        if keep.dim() != 3 or keep.size(1) != keep.size(2):
            raise ValueError(f"keep must be (heads, N, N), got {tuple(keep.shape)}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        self.register_buffer("keep", keep.to(torch.bool), persistent=False)  # rebuilt from the pattern file
        self.block = block
        self.label = label
        self._layouts: "OrderedDict[tuple, object]" = OrderedDict()

    @property
    def heads(self) -> int:
        return self.keep.size(0)

    @property
    def length(self) -> int:
        return self.keep.size(1)

    def _apply(self, fn, *args, **kwargs):
        self._layouts.clear()  # layouts live on the mask's device
        return super()._apply(fn, *args, **kwargs)

    def rows(self, query_start: Tensor, key_start: Tensor, tgt_len: int, src_len: int) -> Tensor:
        """bool (B, H, Lq, Lk): query ``i`` of row ``b`` sits at position ``query_start[b] + i``, key ``j`` at
        ``key_start[b] + j``. Negative positions (left padding) are looked up clamped: padding is masked by the
        caller anyway."""
        n = self.length
        device = self.keep.device
        qpos = query_start.to(device).view(-1, 1) + torch.arange(tgt_len, device=device)
        kpos = key_start.to(device).view(-1, 1) + torch.arange(src_len, device=device)
        looked_up = self.keep[:, qpos.clamp(0, n - 1).unsqueeze(2), kpos.clamp(0, n - 1).unsqueeze(1)]
        unknown = (qpos >= n).unsqueeze(2) | (kpos >= n).unsqueeze(1)  # beyond the collected length: kept
        return (looked_up | unknown.unsqueeze(0)).transpose(0, 1)

    def shared(self, query_start: int, tgt_len: int, src_len: int) -> Tensor:
        """bool (H, Lq, Lk) for a batch whose queries start at position ``query_start`` and keys at 0."""
        start = torch.tensor([query_start])
        return self.rows(start, torch.zeros(1, dtype=torch.long), tgt_len, src_len)[0]

    def layout(self, key: tuple, build):
        """Cached ``build()`` under ``key`` (a small LRU: one entry per distinct shape)."""
        if key in self._layouts:
            self._layouts.move_to_end(key)
            return self._layouts[key]
        value = build()
        self._layouts[key] = value
        if len(self._layouts) > _LAYOUT_CACHE_SIZE:
            self._layouts.popitem(last=False)
        return value

    def extra_repr(self) -> str:
        return f"{self.label!r}, heads={self.heads}, length={self.length}, block={self.block}"


def leading_padding(key_padding_mask: Optional[Tensor], bsz: int, device) -> Tensor:
    """(B,) number of padding positions before the first real token of every row (left padding)."""
    if key_padding_mask is None:
        return torch.zeros(bsz, dtype=torch.long, device=device)
    return key_padding_mask.to(torch.long).cumprod(dim=1).sum(dim=1)


def roll_rows(x: Tensor, shift: Tensor, dim: int) -> Tensor:
    """Row ``b`` of ``x`` (batch on dim 0) cyclically shifted left by ``shift[b]`` along ``dim``:
    ``out[b, ..., i] = x[b, ..., (i + shift[b]) % L]``. Turns left-padded rows into right-padded ones."""
    length = x.size(dim)
    index = (torch.arange(length, device=x.device).unsqueeze(0) + shift.view(-1, 1)) % length  # (B, L)
    view = [x.size(0)] + [1] * (x.dim() - 1)
    view[dim] = length
    return x.gather(dim, index.view(view).expand_as(x))


def mask_positions(key_padding_mask: Optional[Tensor], bsz: int, tgt_len: int, query_offset: int, cross: bool,
                   device) -> Tuple[Tensor, Tensor]:
    """(query_start, key_start), each (B,), of a full (non-incremental) attention call: keys count from their
    first real token; self-attention queries are the same tokens; cross-attention queries (the decoder side,
    right-padded in fairseq) start at ``query_offset``."""
    shift = leading_padding(key_padding_mask, bsz, device)
    key_start = -shift
    if cross:
        query_start = torch.full((bsz,), query_offset, dtype=torch.long, device=device)
    else:
        query_start = query_offset - shift
    return query_start, key_start


def _registered_attentions(capability: str) -> str:
    from ..modules.attention_base import registered_attentions  # the attention base imports this module

    return registered_attentions(capability)


class PrunableAttentionMixin:
    """How an attention applies its :class:`GlobalAttentionMask` (mixed into the attention base, so every
    attention gets it): :meth:`set_global_mask` attaches one, and every call of the attention's math goes through
    :meth:`_core_attend`, which restricts it to the kept entries with :meth:`attend_pruned`. Attentions with a
    faster way (softmax: a block-sparse kernel) override :meth:`attend_pruned`."""

    # ``self.global_mask`` (a submodule, or None) is set by the attention's __init__: a class attribute here would
    # shadow the submodule that nn.Module keeps in ``_modules``

    def set_global_mask(self, mask: Optional[GlobalAttentionMask]) -> None:
        """Prune this attention with a global keep mask (or remove it with None): every call (training,
        validation, decoding) then attends only to the kept (query position, key position) entries."""
        if mask is not None:
            if not self.supports_attn_mask:
                raise ValueError(
                    f"{type(self).__name__} cannot apply a global attention mask ({mask.label}): its math never "
                    f"forms the attention matrix. Prune one of these attentions instead: "
                    f"{_registered_attentions('supports_attn_mask')}"
                )
            if mask.heads != self.num_heads:
                raise ValueError(f"global attention mask {mask.label} has {mask.heads} heads but "
                                 f"{type(self).__name__} has {self.num_heads}")
        self.global_mask = mask

    def attend_pruned(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
        query_offset: int,
        query_start: Tensor,
        key_start: Tensor,
        need_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`attend` restricted to the entries :attr:`global_mask` keeps. Query ``i`` of row ``b`` sits at
        position ``query_start[b] + i``, key ``j`` at ``key_start[b] + j``.

        This default folds the mask into ``attn_mask`` (exact for any attention that honours ``attn_mask``, but
        it computes every entry); a query with no kept, unpadded (and, if causal, past) key gets output and
        weights 0. :class:`~fluence_fairseq.modules.softmax.SoftmaxAttention` overrides it with a
        block-sparse kernel that never computes pruned blocks."""
        bsz, _, tgt_len, _ = q.shape
        src_len = k.size(2)
        keep = self.global_mask.rows(query_start, key_start, tgt_len, src_len).to(q.device)
        base = attn_mask if attn_mask is not None else q.new_zeros(1, 1, 1, 1)
        attn_mask = base.expand(bsz, self.num_heads, tgt_len, src_len).masked_fill(~keep, torch.finfo(q.dtype).min)
        out, weights = self.attend(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                   query_offset=query_offset, need_weights=need_weights)
        visible = keep
        if key_padding_mask is not None:
            visible = visible & ~key_padding_mask.view(bsz, 1, 1, src_len)
        if self.causal and not self.cross:
            past = (torch.arange(src_len, device=q.device) <= torch.arange(tgt_len, device=q.device).view(-1, 1)
                    + query_offset)
            visible = visible & past
        empty = ~visible.any(dim=-1, keepdim=True)  # (B, H, Lq, 1)
        if bool(empty.any()):
            out = out.masked_fill(empty, 0.0)
            weights = None if weights is None else weights.masked_fill(empty, 0.0)
        return out, weights

    def _core_attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights, positions=None):
        """:meth:`attend`, or :meth:`attend_pruned` when a global mask is set (positions derived from the padding
        unless given as ``(query_start, key_start)``)."""
        if self.global_mask is None:
            return self.attend(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                               query_offset=query_offset, need_weights=need_weights)
        if positions is None:
            positions = mask_positions(key_padding_mask, q.size(0), q.size(2), query_offset, self.cross, q.device)
        query_start, key_start = positions
        return self.attend_pruned(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                  query_offset=query_offset, query_start=query_start, key_start=key_start,
                                  need_weights=need_weights)
