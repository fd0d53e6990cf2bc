"""Slow, obviously-correct reference attention used by the tests."""
import torch


def heads(attn, x):
    """(L, B, D) -> (B, H, L, Dh) with the module's own layout."""
    return x.view(x.size(0), x.size(1), attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)


def reference_attention(attn, query, key, *, causal, key_padding_mask=None, span=None):
    """Explicit softmax attention with the module's projections; ``span`` (an AdaptiveSpan) masks and
    renormalises the probabilities the way the original adaptive-span code does."""
    bsz = query.size(1)
    q = heads(attn, attn.q_proj(query))
    k = heads(attn, attn.k_proj(key))
    v = heads(attn, attn.v_proj(key))
    scores = (q * attn.head_dim ** -0.5) @ k.transpose(-1, -2)
    tgt_len, src_len = scores.shape[-2:]
    neg = torch.finfo(scores.dtype).min
    if causal:
        future = torch.ones(tgt_len, src_len, dtype=torch.bool).triu(1 + src_len - tgt_len)
        scores = scores.masked_fill(future, neg)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.view(bsz, 1, 1, src_len), neg)
    probs = scores.softmax(-1)
    if span is not None:
        probs = span(probs)
    out = (probs @ v).permute(2, 0, 1, 3).reshape(tgt_len, bsz, attn.embed_dim)
    return attn.out_proj(out)
