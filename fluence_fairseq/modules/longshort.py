"""Long-short attention (Transformer-LS; Zhu et al., 2021, "Long-Short Transformer: Efficient Transformers for
Language and Vision"), noncausal (the reference's ``AttentionLS``) and causal (``CausalLS``) self attention."""
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..ops.longshort import compress_chunks, dense_joint_attention, head_layer_norm, long_short_attention
from .attention_base import FluenceAttention, fsmha
from ..flag_types import IntRange
from .spec import AttentionOption, AttentionSpec, check_int

__all__ = ["LongShortAttention", "FSLongShortAttention", "LongShort", "FSLongShort"]

#: ``ls_window_size=0`` picks these
DEFAULT_WINDOW = {False: 15, True: 256}



class LongShortAttention(FluenceAttention):
    """Long-short attention: a short-range window branch and a long-range compressed branch sharing ONE softmax.

    Per head, keys and values first pass through a layer norm ``LN_L`` (the paper's DualLN, local half).

    * **Noncausal self** (``AttentionLS``): query ``i`` attends the band of keys ``|i - j| <= w``
      (``w = ls_window_size``, 15 by default: ``2w + 1`` keys) and ``r = num_landmarks`` landmarks. The landmarks
      come from a dynamic projection: ``P = softmax_over_positions(K W_P + b_P)`` (a learned per-head map
      ``head_dim -> r``; padded keys excluded), ``K_bar = LN_G(P^T K)``, ``V_bar = LN_G(P^T V)``.
    * **Causal self** (``CausalLS``): query ``t`` attends the last ``w`` keys ``t-w+1 .. t`` (256 by default) and
      the compressed chunks lying entirely before that window: chunk ``m`` (positions ``m*c .. m*c+c-1``,
      ``c = chunk_size``) is compressed to ``chunk_rank`` vectors by a softmax over its positions of a learned map of
      its keys (then ``LN_G``), and is visible to query ``t`` iff ``m*c + c - 1 <= t - w``. So no key is seen by
      both branches (no double counting). The compressed part costs O(L * L / c * chunk_rank), as in the reference.

    Scores are ``q.k / sqrt(head_dim)``; the window keys and the global columns share one softmax, computed in
    query blocks of ``block_size`` queries (default: 16/32/128 by window, the CPU flash forward at most 64; a
    constructor keyword, not a flag) by one custom autograd node whose backward recomputes the probabilities
    (memory: a few L x D tensors).
    ``need_weights`` returns None: with ``LN_G`` after the projection the output is no mixture of the input keys'
    values, so there is no (L, L) weight matrix to report.

    Decoding state (causal; batch on dim 0): ``ls_pos`` (B,) the tokens seen since the sequence's first real
    (non left-padding) token; ``ls_recent_key``/``ls_recent_value`` (B, H, <= max(w, c) - 1, Dh) the newest
    normalised keys/values (the window and the current incomplete chunk) with ``ls_recent_pad`` (B, ...);
    ``ls_chunk_key``/``ls_chunk_value`` (B, H, completed chunks * chunk_rank, Dh) with ``ls_chunk_valid``.
    With :meth:`set_mem_len` (``--mem-len``, memory over a stream) only the chunks covering the last ``mem_len``
    tokens are kept between calls (``ls_chunk_first`` (B,) counts the dropped ones); without it they grow by
    ``chunk_rank`` vectors every ``chunk_size`` tokens for as long as the stream or the decoding goes on.
    Several tokens per call are computed as one block when all sequences are aligned (same count, no new
    leading padding), else one after the other.

    Chunks are aligned to the sequence's first real token: leading (left) padding is skipped, so left and right
    padding give the same outputs (the reference aligns chunks to absolute positions).

    Differences from NVIDIA/transformer-ls (deliberate):
      * no Transformer-XL memory: the reference's ``h_cache`` memory slots are all zeros, i.e. constant slots;
        we drop them and the relative position terms (``r_net``, ``r_w_bias``, ``r_r_bias``) with them;
      * no conv branch (``conv_kernel_size``; broken in the reference);
      * the noncausal window is a per-query band ``|i - j| <= w`` rather than segments of ``w`` queries sharing
        ``w + 2 * (w // 2)`` keys: the segments tie outputs to absolute positions, so padding would change them;
      * the layer norms are per head (own affine per head) rather than over the whole model width, the
        projection/compression logits are a per-head linear map of the normalised keys instead of the layer
        input, and ``P^T`` mixes the ``LN_L``-normalised keys (the paper's ``LN_G`` still follows);
      * incremental decoding works (the reference caches inputs it never uses, so steps differ from the full pass);
      * a chunk made only of padding is never attended.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSLongShortAttention
        >>> enc = FSLongShortAttention(512, 8, num_landmarks=16, ls_window_size=15)
        >>> x = torch.randn(1000, 2, 512)                      # (length, batch, dim)
        >>> out, _ = enc(x, x, x, need_weights=False)
        >>> dec = FSLongShortAttention(512, 8, causal=True, ls_window_size=128, chunk_size=32, chunk_rank=1)
        >>> state = {}
        >>> y, _ = dec(x[:1], x[:1], x[:1], incremental_state=state, need_weights=False)  # one decoding step
    """

    decoding_state = "the last w keys/values, the compressed chunks and the current chunk"
    keeps_output = False  # its backward does not read its output (see FluenceAttention.keeps_output)
    grows_without_mem_len = True  # chunk_rank compressed vectors per chunk_size tokens, kept for ever without it
    float32_math = True  # its own autograd kernels keep float32 accumulators
    position_scheme = "alibi"  # on the window and on the compressed chunks (at their centres): causal only
    alibi_causal_self_only = "its noncausal landmarks summarise the whole sequence and have no position"

    forms_weights = False
    supported_patterns = frozenset({(False, False), (False, True)})
    supports_attn_mask = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        num_landmarks: int = 16,
        ls_window_size: int = 0,
        chunk_size: int = 32,
        chunk_rank: int = 1,
        block_size: Optional[int] = None,
        **kwargs,
    ):
        check_int("num_landmarks", num_landmarks, 1, "the number of landmarks r of the long branch")
        check_int("ls_window_size", ls_window_size, 0,
                  "0 = the default: 15 for noncausal, 256 for causal attention")
        check_int("chunk_size", chunk_size, 1, "tokens per compressed chunk, causal attention")
        check_int("chunk_rank", chunk_rank, 1, "vectors per compressed chunk, causal attention")
        if block_size is not None:
            check_int("block_size", block_size, 1)
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.window_size = ls_window_size or DEFAULT_WINDOW[self.causal]
        self.num_landmarks = num_landmarks
        self.chunk_size = chunk_size
        self.chunk_rank = chunk_rank
        self.block_size = block_size
        heads, dim = num_heads, self.head_dim
        rank = chunk_rank if self.causal else num_landmarks
        # dual layer norm: LN_L on every key/value, LN_G on the projected landmarks / compressed chunks
        self.ln_local_weight = nn.Parameter(torch.ones(heads, dim))
        self.ln_local_bias = nn.Parameter(torch.zeros(heads, dim))
        self.ln_global_weight = nn.Parameter(torch.ones(heads, dim))
        self.ln_global_bias = nn.Parameter(torch.zeros(heads, dim))
        # dynamic projection (noncausal: r landmarks) or chunk compression (causal: chunk_rank per chunk)
        self.proj_weight = nn.Parameter(torch.randn(heads, dim, rank) * dim**-0.5)
        self.proj_bias = nn.Parameter(torch.zeros(heads, rank))

    def extra_repr(self) -> str:
        if self.causal:
            extra = f"window={self.window_size}, chunk_size={self.chunk_size}, chunk_rank={self.chunk_rank}"
        else:
            extra = f"window={self.window_size}, num_landmarks={self.num_landmarks}"
        return f"{self._pattern_repr()}, {extra}"

    # ------------------------------------------------------------------------------------------- pieces
    def _local_norm(self, x: Tensor) -> Tensor:
        return head_layer_norm(x, self.ln_local_weight, self.ln_local_bias)

    def _global_norm(self, x: Tensor) -> Tensor:
        return head_layer_norm(x, self.ln_global_weight, self.ln_global_bias)

    def _proj_logits(self, kn: Tensor) -> Tensor:
        """(B, H, L, Dh) normalised keys -> (B, H, L, rank) projection logits, float32 or wider."""
        logits = torch.matmul(kn, self.proj_weight.unsqueeze(0).to(kn.dtype)) + self.proj_bias.unsqueeze(1)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _dropout_p(self) -> float:
        return self.dropout_module.p if self.training else 0.0

    # --------------------------------------------------------------------------------------------- math
    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        if attn_mask is not None:  # refused by the base already; kept for direct callers
            raise ValueError(f"{type(self).__name__} cannot apply an arbitrary attn_mask")
        if query_offset != 0 or q.size(2) != k.size(2):
            raise ValueError(f"{type(self).__name__} is a self attention: queries and keys must coincide")
        if self.causal:
            return self._attend_causal(q, k, v, key_padding_mask), None
        return self._attend_noncausal(q, k, v, key_padding_mask), None

    def _attend_noncausal(self, q, k, v, key_padding_mask):
        return long_short_attention(
            q, k, v, ln_local=(self.ln_local_weight, self.ln_local_bias),
            ln_global=(self.ln_global_weight, self.ln_global_bias), proj_weight=self.proj_weight,
            proj_bias=self.proj_bias, key_padding_mask=key_padding_mask, causal=False, window=self.window_size,
            dropout_p=self._dropout_p(), block_size=self.block_size, reuse_buffers=self.heads_exclusive,
        )

    def _chunk_of(self, n_cols: int, device, first_chunk: int = 0) -> Tensor:
        """The chunk of each compressed column g: ``first_chunk + g // rank``."""
        return first_chunk + torch.arange(n_cols, device=device) // self.chunk_rank

    def _chunk_start(self, n_cols: int, device, first_chunk: int = 0) -> Tensor:
        """First query position that sees compressed column g: its chunk's end + window."""
        return (self._chunk_of(n_cols, device, first_chunk) + 1) * self.chunk_size - 1 + self.window_size

    def _chunk_centre(self, n_cols: int, device, first_chunk: int = 0) -> Tensor:
        """Position of compressed column g for ALiBi: the middle of its chunk."""
        return self._chunk_of(n_cols, device, first_chunk) * self.chunk_size + (self.chunk_size - 1) / 2

    def _attend_causal(self, q, k, v, key_padding_mask):
        bsz, _, length, _ = q.shape
        lead = None
        if key_padding_mask is not None:
            lead = key_padding_mask.long().cumprod(dim=1).sum(dim=1)  # leading (left) padding per sequence
            if bool((lead == 0).all()):
                lead = None
        if lead is not None:
            # move each sequence's first real token to position 0 so that chunks start there
            pos = torch.arange(length, device=q.device)
            src = pos.unsqueeze(0) + lead.unsqueeze(1)  # (B, L)
            beyond = src >= length
            index = src.clamp(max=length - 1).view(bsz, 1, length, 1).expand(-1, q.size(1), -1, q.size(3))
            q, k, v = q.gather(2, index), k.gather(2, index), v.gather(2, index)
            key_padding_mask = key_padding_mask.gather(1, src.clamp(max=length - 1)) | beyond
        out = long_short_attention(
            q, k, v, ln_local=(self.ln_local_weight, self.ln_local_bias),
            ln_global=(self.ln_global_weight, self.ln_global_bias), proj_weight=self.proj_weight,
            proj_bias=self.proj_bias, key_padding_mask=key_padding_mask, causal=True, window=self.window_size,
            chunk_size=self.chunk_size, dropout_p=self._dropout_p(), block_size=self.block_size,
            alibi_slopes=getattr(self, "alibi_slopes", None), reuse_buffers=self.heads_exclusive,
        )
        if lead is not None:
            # back to the original positions; leading padded queries get zeros
            dst = torch.arange(length, device=q.device).unsqueeze(0) - lead.unsqueeze(1)
            index = dst.clamp(min=0).view(bsz, 1, length, 1).expand(-1, out.size(1), -1, out.size(3))
            out = out.gather(2, index).masked_fill((dst < 0).view(bsz, 1, length, 1), 0.0)
        return out

    # ----------------------------------------------------------------------------------------- decoding
    def max_cached_keys(self) -> Optional[int]:
        return max(self.window_size, self.chunk_size) - 1

    def max_memory_chunks(self) -> Optional[int]:
        """Compressed chunks kept between calls: those covering the last ``mem_len`` tokens (None: all)."""
        return None if self.mem_len is None else -(-self.mem_len // self.chunk_size)

    def _trim_chunks(self, buffer) -> None:
        """After a call, drop the oldest compressed chunks beyond :meth:`max_memory_chunks` (all sequences
        share the chunk columns, so only chunks every sequence has left behind are dropped)."""
        keep, chunk_k = self.max_memory_chunks(), buffer.get("ls_chunk_key")
        if keep is None or chunk_k is None:
            return
        rank, first = self.chunk_rank, self._first_chunk(buffer)
        completed = int((buffer["ls_pos"] // self.chunk_size).min())  # chunks the slowest sequence completed
        drop = min(completed - keep - first, chunk_k.size(2) // rank)
        if drop <= 0:
            return
        for name in ("ls_chunk_key", "ls_chunk_value"):
            buffer[name] = buffer[name][:, :, drop * rank:]
        buffer["ls_chunk_valid"] = buffer["ls_chunk_valid"][:, drop * rank:]
        buffer["ls_chunk_first"] = torch.full_like(buffer["ls_pos"], first + drop)

    def attend_incremental(self, q, k, v, *, key_padding_mask, attn_mask, buffer, need_weights):
        if attn_mask is not None:
            raise ValueError(f"{type(self).__name__} cannot apply an arbitrary attn_mask")
        if q.size(2) > 1 and self._aligned(buffer, key_padding_mask):
            out = self._decode_block(q, k, v, key_padding_mask, buffer)
        else:
            outs = []
            for i in range(q.size(2)):
                pad = None if key_padding_mask is None else key_padding_mask[:, i]
                outs.append(self._decode_step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], pad, buffer))
            out = torch.cat(outs, dim=2)
        self._trim_chunks(buffer)
        return out, None

    @staticmethod
    def _first_chunk(buffer) -> int:
        first = buffer.get("ls_chunk_first")
        return 0 if first is None else int(first[0])

    @staticmethod
    def _aligned(buffer, key_padding_mask) -> bool:
        """Every sequence has counted the same number of tokens and none of the new ones is leading padding, so
        all sequences share chunk boundaries and the call can be computed as one block."""
        pos = buffer.get("ls_pos")
        if pos is None or bool((pos == 0).any()):
            if pos is not None and not bool((pos == 0).all()):
                return False
            return key_padding_mask is None or not bool(key_padding_mask[:, 0].any())
        return bool((pos == pos[0]).all())

    def _decode_block(self, q, k, v, pad, buffer):
        """Several new tokens at once (all sequences aligned, see :meth:`_aligned`)."""
        bsz, heads, n, dim = q.shape
        device = q.device
        w, c, rank = self.window_size, self.chunk_size, self.chunk_rank
        pos = buffer.get("ls_pos")
        start = 0 if pos is None else int(pos[0])  # position of the first new token
        if pad is None:
            pad = torch.zeros(bsz, n, dtype=torch.bool, device=device)
        kn, vn = self._local_norm(k), self._local_norm(v)
        recent_k = buffer.get("ls_recent_key")
        if recent_k is not None and start > 0:
            kn_all = torch.cat([recent_k, kn], 2)
            vn_all = torch.cat([buffer["ls_recent_value"], vn], 2)
            pad_all = torch.cat([buffer["ls_recent_pad"], pad], 1)
        else:
            kn_all, vn_all, pad_all = kn, vn, pad
        first = start - (kn_all.size(2) - n)  # position of kn_all[:, :, 0]
        n_done = start // c
        first_chunk = self._first_chunk(buffer)  # chunks before it were dropped (mem_len)
        chunk_k, chunk_v = buffer.get("ls_chunk_key"), buffer.get("ls_chunk_value")
        chunk_valid = buffer.get("ls_chunk_valid")
        if chunk_k is not None:
            kept = (n_done - first_chunk) * rank
            chunk_k, chunk_v, chunk_valid = chunk_k[:, :, :kept], chunk_v[:, :, :kept], chunk_valid[:, :kept]
        n_new = (start + n) // c - n_done  # chunks completed by this call
        if n_new > 0:
            a, b = n_done * c - first, (n_done + n_new) * c - first
            ck, cv, valid = compress_chunks(kn_all[:, :, a:b], vn_all[:, :, a:b],
                                            self._proj_logits(kn_all[:, :, a:b]), pad_all[:, a:b], c)
            ck, cv = self._global_norm(ck), self._global_norm(cv)
            chunk_k = ck if chunk_k is None else torch.cat([chunk_k, ck], 2)
            chunk_v = cv if chunk_v is None else torch.cat([chunk_v, cv], 2)
            chunk_valid = valid if chunk_valid is None else torch.cat([chunk_valid, valid], 1)
        if chunk_k is None:
            chunk_k = chunk_v = kn.new_zeros(bsz, heads, 0, dim)
            chunk_valid = torch.zeros(bsz, 0, dtype=torch.bool, device=device)
        slopes, distance = getattr(self, "alibi_slopes", None), None
        if slopes is not None:  # from each new query to each compressed chunk's centre
            queries = torch.arange(start, start + n, device=device)
            distance = (queries.unsqueeze(1) - self._chunk_centre(chunk_k.size(2), device, first_chunk)).unsqueeze(0)
        out = dense_joint_attention(
            q, kn_all, vn_all, chunk_k, chunk_v, key_valid=~pad_all, glob_valid=chunk_valid,
            glob_start=self._chunk_start(chunk_k.size(2), device, first_chunk) - first,
            left=w - 1, right=0, query_offset=kn_all.size(2) - n, dropout_p=self._dropout_p(),
            alibi_slopes=slopes, glob_distance=distance,
        )
        keep = self.max_cached_keys()
        buffer["ls_pos"] = torch.full((bsz,), start + n, dtype=torch.long, device=device)
        buffer["ls_recent_key"] = kn_all[:, :, -keep:] if keep > 0 else kn_all[:, :, :0]
        buffer["ls_recent_value"] = vn_all[:, :, -keep:] if keep > 0 else vn_all[:, :, :0]
        buffer["ls_recent_pad"] = pad_all[:, -keep:] if keep > 0 else pad_all[:, :0]
        if chunk_k.size(2) > 0:
            buffer["ls_chunk_key"], buffer["ls_chunk_value"], buffer["ls_chunk_valid"] = chunk_k, chunk_v, chunk_valid
        return out

    def _decode_step(self, q: Tensor, k: Tensor, v: Tensor, pad: Optional[Tensor],
                     buffer: Dict[str, Optional[Tensor]]) -> Tensor:
        bsz, heads, _, dim = q.shape
        device = q.device
        w, c, rank = self.window_size, self.chunk_size, self.chunk_rank
        if pad is None:
            pad = torch.zeros(bsz, dtype=torch.bool, device=device)
        kn, vn = self._local_norm(k), self._local_norm(v)
        pos = buffer.get("ls_pos")
        if pos is None:
            pos = torch.zeros(bsz, dtype=torch.long, device=device)
        leading = (pos == 0) & pad  # left padding before the first real token: not counted
        pos = pos + (~leading).long()
        here = pos - 1  # this token's position counted from the first real token (-1: leading padding)

        recent_k, recent_v = buffer.get("ls_recent_key"), buffer.get("ls_recent_value")
        if recent_k is not None:
            kn_all, vn_all = torch.cat([recent_k, kn], 2), torch.cat([recent_v, vn], 2)
            pad_all = torch.cat([buffer["ls_recent_pad"], pad.unsqueeze(1)], 1)
        else:
            kn_all, vn_all, pad_all = kn, vn, pad.unsqueeze(1)

        chunk_k, chunk_v = buffer.get("ls_chunk_key"), buffer.get("ls_chunk_value")
        chunk_valid = buffer.get("ls_chunk_valid")
        first_chunk = self._first_chunk(buffer)  # chunks before it were dropped (mem_len)
        done = (~leading) & (pos % c == 0)  # this token completes a chunk
        if bool(done.any()):
            last_k, last_v = kn_all[:, :, -c:], vn_all[:, :, -c:]
            ck, cv, valid = compress_chunks(last_k, last_v, self._proj_logits(last_k), pad_all[:, -c:], c)
            ck, cv = self._global_norm(ck), self._global_norm(cv)  # (B, H, rank, Dh)
            slot0 = (pos // c - 1 - first_chunk) * rank  # first column of the completed chunk, per sequence
            need = int((slot0[done].max() + rank).item())
            have = 0 if chunk_k is None else chunk_k.size(2)
            if need > have:
                grow = need - have
                new_k = kn.new_zeros(bsz, heads, grow, dim)
                new_valid = torch.zeros(bsz, grow, dtype=torch.bool, device=device)
                chunk_k = new_k if chunk_k is None else torch.cat([chunk_k, new_k], 2)
                chunk_v = new_k.clone() if chunk_v is None else torch.cat([chunk_v, new_k], 2)
                chunk_valid = new_valid if chunk_valid is None else torch.cat([chunk_valid, new_valid], 1)
            cols = torch.arange(chunk_k.size(2), device=device)
            offset = cols.unsqueeze(0) - slot0.unsqueeze(1)  # (B, G)
            write = done.unsqueeze(1) & (offset >= 0) & (offset < rank)
            pick = offset.clamp(0, rank - 1).view(bsz, 1, -1, 1).expand(-1, heads, -1, dim)
            write4 = write.view(bsz, 1, -1, 1)
            chunk_k = torch.where(write4, ck.gather(2, pick), chunk_k)
            chunk_v = torch.where(write4, cv.gather(2, pick), chunk_v)
            chunk_valid = torch.where(write, valid.gather(1, offset.clamp(0, rank - 1)), chunk_valid)

        # the query sees the last w keys (itself included) and the chunks ending at or before here - w
        win_k, win_v, win_pad = kn_all[:, :, -w:], vn_all[:, :, -w:], pad_all[:, -w:]
        if chunk_k is not None:
            start = self._chunk_start(chunk_k.size(2), device, first_chunk)
            glob_ok = chunk_valid & (here.unsqueeze(1) >= start.unsqueeze(0))  # (B, G)
            gk, gv = chunk_k, chunk_v
        else:
            gk = gv = kn.new_zeros(bsz, heads, 0, dim)
            glob_ok = torch.zeros(bsz, 0, dtype=torch.bool, device=device)
        out = dense_joint_attention(
            q, win_k, win_v, gk, gv, key_valid=~win_pad, glob_valid=glob_ok,
            glob_start=torch.zeros(gk.size(2), dtype=torch.long, device=device),
            left=w - 1, right=0, query_offset=win_k.size(2) - 1, dropout_p=self._dropout_p(),
            alibi_slopes=getattr(self, "alibi_slopes", None),
            glob_distance=None if getattr(self, "alibi_slopes", None) is None else
            (here.unsqueeze(1) - self._chunk_centre(gk.size(2), device, first_chunk)).unsqueeze(1),
        )

        keep = self.max_cached_keys()
        buffer["ls_pos"] = pos
        buffer["ls_recent_key"] = kn_all[:, :, -keep:] if keep > 0 else kn_all[:, :, :0]
        buffer["ls_recent_value"] = vn_all[:, :, -keep:] if keep > 0 else vn_all[:, :, :0]
        buffer["ls_recent_pad"] = pad_all[:, -keep:] if keep > 0 else pad_all[:, :0]
        if chunk_k is not None:
            buffer["ls_chunk_key"], buffer["ls_chunk_value"], buffer["ls_chunk_valid"] = chunk_k, chunk_v, chunk_valid
        return out


@fsmha
class FSLongShortAttention(LongShortAttention):
    """:class:`LongShortAttention` accepting fairseq's MultiheadAttention keywords."""


ATTENTION_SPEC = AttentionSpec(
    "longshort", FSLongShortAttention,
    (
        AttentionOption("num_landmarks", IntRange(1), help="long-short (noncausal): landmarks r of the dynamic projection"),
        AttentionOption("ls_window_size", IntRange(0, meaning="tokens"), help="long-short window: noncausal sees |i-j| <= w, causal the last w tokens; "
                        "0 = 15 (noncausal) / 256 (causal)"),
        AttentionOption("chunk_size", IntRange(1, meaning="tokens"), help="long-short (causal): tokens per compressed chunk"),
        AttentionOption("chunk_rank", IntRange(1), help="long-short (causal): vectors per compressed chunk"),
    ),
    "long-short transformer (Zhu et al. 2021): window + dynamic projection, one softmax; noncausal and causal self",
    tiny={"num_landmarks": 4, "ls_window_size": 4, "chunk_size": 4, "chunk_rank": 2},
    bench_time_bound=1.6,
)


# the names before 0.2, kept for code that imports them
LongShort = LongShortAttention
FSLongShort = FSLongShortAttention
