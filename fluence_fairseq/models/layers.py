"""Transformer layers, encoder and decoder whose attention sublayers come from the fluence attention registry.

Only the hooks fairseq provides are overridden: ``build_self_attention``/``build_encoder_attention`` in the layers,
``build_encoder_layer``/``build_decoder_layer`` in the encoder and decoder (keeping fairseq's activation
checkpointing and FSDP wrapping), the encoder's ``reorder_encoder_out`` (which skips reorders that change nothing)
and the decoder's ``buffered_future_mask``, so everything else (layer norms, FFN, LayerDrop, incremental decoding,
state-dict upgrades) is fairseq's own code.

Dropout modules are named after the layer class, so ``--retain-dropout-modules`` takes
``FluenceTransformerEncoderLayer``/``FluenceTransformerDecoderLayer`` for these models.
"""
from typing import Dict, List, Optional

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.utils import safe_getattr
from torch import Tensor

from ..modules.attention_base import FluenceAttention
from .attention_args import DECODER_CROSS, DECODER_SELF, ENCODER_SELF, build_attention


def _no_xformers(cfg, side):
    if safe_getattr(cfg, f"{side}_xformers_att_config", None):
        raise ValueError(f"--{side}-xformers-att-config cannot be combined with fluence attentions; drop it")


class FluenceTransformerEncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer with the self attention chosen by ``--encoder-self-attention``."""

    def build_self_attention(self, embed_dim, cfg):
        _no_xformers(cfg, "encoder")
        return build_attention(
            cfg, ENCODER_SELF, embed_dim, cfg.encoder.attention_heads, dropout=cfg.attention_dropout,
            q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
        )


class FluenceTransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer with ``--decoder-self-attention`` (built causal) and ``--cross-attention``."""

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        if add_bias_kv or add_zero_attn:
            raise ValueError("fluence attentions do not implement add_bias_kv/add_zero_attn")
        if cfg.cross_self_attention:
            raise ValueError(
                "--cross-self-attention is not supported with fluence attentions (the decoder self attention "
                "would attend to the encoder output); drop the flag"
            )
        _no_xformers(cfg, "decoder")
        return build_attention(
            cfg, DECODER_SELF, embed_dim, cfg.decoder.attention_heads, dropout=cfg.attention_dropout,
            q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
        )

    def build_encoder_attention(self, embed_dim, cfg):
        _no_xformers(cfg, "encoder")
        return build_attention(
            cfg, DECODER_CROSS, embed_dim, cfg.decoder.attention_heads, dropout=cfg.attention_dropout,
            kdim=cfg.encoder.embed_dim, vdim=cfg.encoder.embed_dim,
            q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
        )


def _wrap(layer, cfg):
    """fairseq's wrapping of a freshly built layer: activation checkpointing, then FSDP."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    # a checkpointed layer is always wrapped by FSDP, whatever its size (as in fairseq)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


#: the entry of an encoder output that says, for each of its rows, which row of the encoder's own output it is a
#: copy of (beam search repeats every sentence's output for its beams)
SOURCE_ROWS = "fluence_source_rows"


def _encoder_rows(encoder_out: Dict[str, List[Tensor]]) -> Optional[int]:
    """The batch of an encoder output (None when it holds no batch-sized tensor)."""
    for name, dim in (("encoder_out", 1), ("encoder_padding_mask", 0), ("encoder_embedding", 0), ("src_lengths", 0)):
        if encoder_out.get(name):
            return encoder_out[name][0].size(dim)
    return None


class FluenceTransformerEncoder(TransformerEncoder):
    def build_encoder_layer(self, args):
        cfg = TransformerConfig.from_namespace(args)
        return _wrap(FluenceTransformerEncoderLayer(cfg, return_fc=self.return_fc), cfg)

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor):
        """fairseq's reorder, skipped when it would change nothing: every row of the output records which row of
        the encoder's own output it is a copy of (:data:`SOURCE_ROWS`), and a reorder that gives every row a copy of
        the row it already holds (fairseq's beam search, at every step, moves each beam among its own sentence's)
        returns the output as it is. fairseq's reorder copies the whole output (and its embedding) at every step:
        skipping those copies took a base-size model's beam search (8 sentences of 256 tokens, beam 5) to 0.96x its
        time."""
        rows = encoder_out.get(SOURCE_ROWS)
        if rows:
            current = rows[0]
        else:
            batch = _encoder_rows(encoder_out)
            if batch is None:
                return super().reorder_encoder_out(encoder_out, new_order)
            current = torch.arange(batch, device=new_order.device)
        moved = current.index_select(0, new_order)
        if rows and torch.equal(moved, current):
            return encoder_out
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        reordered[SOURCE_ROWS] = [moved]
        return reordered


class FluenceTransformerDecoder(TransformerDecoder):
    """fairseq's decoder with fluence layers.

    Our decoder self attentions are causal by construction (``causal=True``), so the decoder does not build
    fairseq's O(L^2) float future mask: :meth:`buffered_future_mask` returns None. (A decoder self attention that
    is not causal by itself would still get the mask.)
    """

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn,
                         output_projection=output_projection)
        # modules() walks the registered children; it does not iterate LayerDropModuleList (which would drop layers)
        self_attns = [m for m in self.modules() if isinstance(m, FluenceAttention) and not m.cross]
        self.self_attention_is_causal = bool(self_attns) and all(m.causal for m in self_attns)

    def build_decoder_layer(self, args, no_encoder_attn=False):
        cfg = TransformerConfig.from_namespace(args)
        return _wrap(FluenceTransformerDecoderLayer(cfg, no_encoder_attn), cfg)

    def buffered_future_mask(self, tensor):
        if self.self_attention_is_causal:
            return None
        return super().buffered_future_mask(tensor)
