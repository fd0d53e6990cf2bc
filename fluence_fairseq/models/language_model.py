"""``fluence_transformer_lm``: fairseq's decoder-only transformer language model with registry self attention."""
import ast

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model
from fairseq.models.transformer import DEFAULT_MAX_TARGET_POSITIONS
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)
from fairseq.modules import AdaptiveInput, CharacterTokenEmbedder
from fairseq.utils import eval_str_list, safe_getattr

from ..layerdrop import (check_layerdrop_args, normalize_layers_to_keep_args, prune_for_load,
                         restrict_layerdrop_flags)
from ..pruning.flags import add_pruning_args, apply_attention_pruning
from .attention_args import DECODER_SELF, add_attention_args, fill_attention_defaults
from .layers import FluenceTransformerDecoder
from .memory_args import add_memory_args, apply_memory_args


@register_model("fluence_transformer_lm")
class FluenceTransformerLanguageModel(TransformerLanguageModel):
    """Decoder-only transformer LM whose (causal) self attention is ``--decoder-self-attention``.

    Takes the stock ``transformer_lm`` flags plus the attention flags. Unlike the stock model it is registered on
    fairseq's legacy argparse path (no dataclass), so named architectures such as ``transformer_lm_adaptive_span``
    are plain ``--arch`` functions and checkpoints store the argparse namespace.

    ``--decoder-layerdrop`` drops layers in training (fairseq's ``LayerDropModuleList``); ``--decoder-layers-to-keep``
    (or ``--model-overrides``) prunes at load time with :mod:`fluence_fairseq.layerdrop`.
    """

    ATTENTION_ROLES = (DECODER_SELF,)

    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def add_args(cls, parser):
        # the stock model gets its flags from its dataclass; ours is legacy, so generate them the same way
        gen_parser_from_dataclass(parser, TransformerLanguageModelConfig(), delete_default=True)
        restrict_layerdrop_flags(parser, ("decoder",))
        add_attention_args(parser, cls.ATTENTION_ROLES, "fluence_transformer_lm")
        add_pruning_args(parser)
        add_memory_args(parser)

    @classmethod
    def build_model(cls, args, task):
        fill_attention_defaults(args, cls.ATTENTION_ROLES)
        base_lm_architecture(args)  # any argument an old checkpoint lacks gets its default
        check_layerdrop_args(args, ("decoder",))
        # "0,2" or a list of ints, validated; sets decoder_layers to the kept count
        normalize_layers_to_keep_args(args, ("decoder",))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        embed_tokens = cls.build_input_embedding(args, task)
        if args.tie_adaptive_weights:
            if not args.adaptive_input:
                raise ValueError("--tie-adaptive-weights needs --adaptive-input")
            if args.adaptive_input_factor != args.adaptive_softmax_factor:
                raise ValueError("--tie-adaptive-weights needs --adaptive-input-factor == --adaptive-softmax-factor")
            if args.adaptive_softmax_cutoff != args.adaptive_input_cutoff:
                raise ValueError("--tie-adaptive-weights needs --adaptive-softmax-cutoff == --adaptive-input-cutoff")
            if args.decoder_input_dim != args.decoder_output_dim:
                raise ValueError("--tie-adaptive-weights needs --decoder-input-dim == --decoder-output-dim")
        decoder = FluenceTransformerDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        model = cls(decoder)
        model.build_args = args  # the keep list to prune with when load_state_dict gets no config
        apply_attention_pruning(model, args)
        apply_memory_args(model, args)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's ``load_state_dict`` with our ``--decoder-layers-to-keep`` pruning (see
        :meth:`fluence_fairseq.models.FluenceTransformerModel.load_state_dict`)."""
        state_dict = prune_for_load(state_dict, [model_cfg if model_cfg is not None else args,
                                                 getattr(self, "build_args", None)],
                                    {"decoder": len(self.decoder.layers)})
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    @classmethod
    def build_input_embedding(cls, args, task):
        dictionary = task.source_dictionary
        if args.character_embeddings:
            return CharacterTokenEmbedder(
                dictionary, ast.literal_eval(args.character_filters), args.character_embedding_dim,
                args.decoder_embed_dim, args.char_embedder_highway_layers,
            )
        if args.adaptive_input:
            return AdaptiveInput(
                len(dictionary), dictionary.pad(), args.decoder_input_dim, args.adaptive_input_factor,
                args.decoder_embed_dim, eval_str_list(args.adaptive_input_cutoff, type=int),
                args.quant_noise_pq, args.quant_noise_pq_block_size,
            )
        return cls.build_embedding(args, dictionary, args.decoder_input_dim)
