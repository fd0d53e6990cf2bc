"""A standalone encoder stack for Python users: fairseq's transformer encoder layer with any registered attention."""
from typing import Optional

from fairseq.models.transformer import TransformerConfig
from fairseq.modules import LayerNorm
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
from torch import Tensor, nn

from ..modules.masks import padding_mask_to_bool
from ..modules.registry import get_attention


class _EncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer whose self attention is built by the enclosing encoder."""

    def __init__(self, cfg, build):
        self._build = build  # read by build_self_attention, which the base constructor calls
        super().__init__(cfg)

    def build_self_attention(self, embed_dim, cfg):
        return self._build()


class EfficientTransformerEncoder(nn.Module):
    """A stack of transformer encoder layers (fairseq's own layer: attention, FFN, residuals, layer norms) whose
    self attention is any registered fluence attention, for use outside fairseq's models.

    It takes and returns features, so it fits after any embedding (add positions yourself if the attention
    needs them; S4D and local attention are position-aware by construction).

    Args:
        attention: registry name (``local``, ``abc``, ``nystrom``, ``performer``, ``lara``, ``cosformer``,
            ``probsparse``, ``s4d``, ``longshort``, ``softmax``, ``adaptive_span``, ``sparsemax``, ``entmax15``,
            ``alpha_entmax``).
        num_layers, embed_dim, num_heads, ffn_embed_dim: sizes.
        dropout, attention_dropout, activation_dropout: dropout rates (as in fairseq).
        activation_fn: ``relu``, ``gelu``, ...
        normalize_before: pre-norm layers (then a final layer norm is applied).
        causal: build causal self attentions (a decoder-only stack without cross attention).
        **attention_options: the attention's own hyper-parameters (``wsize=31``, ``num_landmarks=32`` ...);
            missing ones take the registry defaults. Unknown options raise a ``ValueError``.

    Example::

        >>> import torch
        >>> from fluence_fairseq import EfficientTransformerEncoder
        >>> encoder = EfficientTransformerEncoder("performer", num_layers=2, embed_dim=64, num_heads=4,
        ...                                       ffn_embed_dim=128, approx_attn_dim=32)
        >>> x = torch.randn(2, 100, 64)                      # (batch, length, dim)
        >>> padding = torch.zeros(2, 100, dtype=torch.bool)
        >>> padding[1, 80:] = True                           # the second sequence has 80 tokens
        >>> y = encoder(x, padding_mask=padding, batch_first=True)
        >>> y.shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        attention: str = "local",
        num_layers: int = 6,
        embed_dim: int = 512,
        num_heads: int = 8,
        ffn_embed_dim: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        activation_fn: str = "relu",
        normalize_before: bool = False,
        causal: bool = False,
        **attention_options,
    ):
        super().__init__()
        spec = get_attention(attention)
        known = {opt.name: opt.default for opt in spec.options}
        unknown = sorted(set(attention_options) - set(known))
        if unknown:
            raise ValueError(f"attention {attention!r} has no option {unknown}; its options are {sorted(known) or 'none'}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        options = {**known, **attention_options}
        self.attention = attention
        self.causal = causal
        cfg = TransformerConfig()
        cfg.encoder.embed_dim = embed_dim
        cfg.encoder.ffn_embed_dim = ffn_embed_dim
        cfg.encoder.attention_heads = num_heads
        cfg.encoder.normalize_before = normalize_before
        cfg.dropout, cfg.attention_dropout, cfg.activation_dropout = dropout, attention_dropout, activation_dropout
        cfg.activation_fn = activation_fn

        def build():
            return spec.build(embed_dim, num_heads, dropout=attention_dropout, causal=causal, cross=False, **options)

        self.layers = nn.ModuleList(_EncoderLayer(cfg, build) for _ in range(num_layers))
        self.layer_norm = LayerNorm(embed_dim) if normalize_before else None

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, batch_first: bool = False) -> Tensor:
        """x: (L, B, D), or (B, L, D) with ``batch_first``; padding_mask: (B, L), True/nonzero = padding.
        Returns features shaped like ``x``; padded positions are zero."""
        if batch_first:
            x = x.transpose(0, 1)
        if x.dim() != 3:
            raise ValueError(f"x must be (length, batch, dim) (or batch first), got {tuple(x.shape)}")
        padding_mask = padding_mask_to_bool(padding_mask, x.size(1), x.size(0), "padding_mask")
        keep = None if padding_mask is None else (~padding_mask).t().unsqueeze(-1).to(x.dtype)
        if keep is not None:
            x = x * keep
        for layer in self.layers:
            x = layer(x, padding_mask)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if keep is not None:
            x = x * keep
        return x.transpose(0, 1) if batch_first else x

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}, causal={self.causal}"

