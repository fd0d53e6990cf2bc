"""``fluence_transformer``: fairseq's encoder-decoder transformer with registry attentions in every sublayer."""
from fairseq.models import register_model
from fairseq.models.transformer import TransformerModel

from ..layerdrop import (check_layerdrop_args, normalize_layers_to_keep_args, prune_for_load,
                         restrict_layerdrop_flags)
from ..pruning.flags import add_pruning_args, apply_attention_pruning
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

    LayerDrop: ``--encoder-layerdrop``/``--decoder-layerdrop`` use fairseq's own ``LayerDropModuleList`` (drops only
    in training). Pruning: ``--encoder-layers-to-keep``/``--decoder-layers-to-keep`` (or the same keys in
    ``--model-overrides``) take ``"0,2"`` or a list of ints; each side is pruned on its own by our
    :meth:`load_state_dict` (see :mod:`fluence_fairseq.layerdrop`), not by fairseq's ``prune_state_dict``.
    """

    LAYER_STACKS = ("encoder", "decoder")

    ATTENTION_ROLES = (ENCODER_SELF, DECODER_SELF, DECODER_CROSS)

    @classmethod
    def hub_models(cls):
        return {}  # no published checkpoints; load local ones with from_pretrained(<dir>, checkpoint_file=...)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        restrict_layerdrop_flags(parser, cls.LAYER_STACKS)
        add_attention_args(parser, cls.ATTENTION_ROLES, "fluence_transformer")
        add_pruning_args(parser)

    @classmethod
    def build_model(cls, args, task):
        fill_attention_defaults(args, cls.ATTENTION_ROLES)
        # fairseq's build_model calls .split(",") on the keep lists, which the CLI parses to lists of ints
        check_layerdrop_args(args, cls.LAYER_STACKS)
        normalize_layers_to_keep_args(args, cls.LAYER_STACKS)
        model = super().build_model(args, task)
        apply_attention_pruning(model, args)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's ``load_state_dict``, with our layer pruning in place of fairseq's ``prune_state_dict``.

        The keep lists come from ``model_cfg`` (or ``args``), else from the args the model was built with. Both are
        reset (``*_layers_to_keep`` None, ``*_layers`` the kept count), so fairseq's own pruning then finds
        nothing to do, and a checkpoint saved afterwards describes the smaller model.
        """
        layers = {side: len(getattr(self, side).layers) for side in self.LAYER_STACKS}
        state_dict = prune_for_load(state_dict, [model_cfg if model_cfg is not None else args, self.args], layers)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return FluenceTransformerEncoder(args, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return FluenceTransformerDecoder(
            args, tgt_dict, embed_tokens, no_encoder_attn=getattr(args, "no_cross_attention", False)
        )
