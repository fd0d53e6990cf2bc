"""``fluence_transformer``: fairseq's encoder-decoder transformer with registry attentions in every sublayer."""
from fairseq.models import register_model
from fairseq.models.transformer import TransformerModel

from .attention_args import DECODER_CROSS, DECODER_SELF, ENCODER_SELF, add_attention_args, fill_attention_defaults
from .layers import FluenceTransformerDecoder, FluenceTransformerEncoder


@register_model("fluence_transformer")
class FluenceTransformerModel(TransformerModel):
    """Transformer (Vaswani et al., 2017) whose attentions are chosen per sublayer.

    ``--encoder-self-attention`` (built noncausal), ``--decoder-self-attention`` (built causal) and
    ``--cross-attention`` (built as cross attention) take any name of the attention registry; each
    attention's options are flags of their own (``--attn-span`` ...). Named architectures such as
    ``transformer_adaptive_span`` set these defaults (:mod:`fluence_fairseq.models.architectures`).

    It stays on fairseq's legacy argparse path, like the stock ``transformer``: the checkpoint stores the argparse
    namespace and the ``--arch`` function runs again at load time.
    """

    ATTENTION_ROLES = (ENCODER_SELF, DECODER_SELF, DECODER_CROSS)

    @classmethod
    def hub_models(cls):
        return {}  # no published checkpoints; load local ones with from_pretrained(<dir>, checkpoint_file=...)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_attention_args(parser, cls.ATTENTION_ROLES, "fluence_transformer")

    @classmethod
    def build_model(cls, args, task):
        fill_attention_defaults(args, cls.ATTENTION_ROLES)
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return FluenceTransformerEncoder(args, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return FluenceTransformerDecoder(
            args, tgt_dict, embed_tokens, no_encoder_attn=getattr(args, "no_cross_attention", False)
        )
