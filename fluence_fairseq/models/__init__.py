"""fairseq models and named architectures of fluence_fairseq.

Registered models: ``fluence_transformer`` (encoder-decoder), ``fluence_transformer_lm`` (decoder-only) and
``hex_classifier`` (sentence classification with HEX). The
``--arch`` names come from the table in :mod:`fluence_fairseq.models.architectures`.
"""
from .attention_args import (
    DECODER_CROSS,
    DECODER_SELF,
    DEFAULT_ATTENTION,
    ENCODER_SELF,
    AttentionRole,
    add_attention_args,
    build_attention,
    fill_attention_defaults,
)
from .layers import (
    FluenceTransformerDecoder,
    FluenceTransformerDecoderLayer,
    FluenceTransformerEncoder,
    FluenceTransformerEncoderLayer,
)
from .encoder_decoder import FluenceTransformerModel
from .language_model import FluenceTransformerLanguageModel
from .architectures import ARCHITECTURES, Architecture, markdown_table, register_architecture
from .efficient_encoder import EfficientTransformerEncoder
from .hex_classifier import HexClassifierModel

__all__ = [
    "AttentionRole", "ENCODER_SELF", "DECODER_SELF", "DECODER_CROSS", "DEFAULT_ATTENTION",
    "add_attention_args", "build_attention", "fill_attention_defaults",
    "FluenceTransformerEncoderLayer", "FluenceTransformerDecoderLayer",
    "FluenceTransformerEncoder", "FluenceTransformerDecoder",
    "FluenceTransformerModel", "FluenceTransformerLanguageModel",
    "ARCHITECTURES", "Architecture", "markdown_table", "register_architecture", "EfficientTransformerEncoder",
    "HexClassifierModel",
]
