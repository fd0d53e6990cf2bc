"""Flags of language models that read a stream segment by segment (``--task fluence_lm_stream``).

* ``--mem-len N``: keys and values of the earlier segments kept by the attentions whose cache is otherwise
  unbounded (softmax, the entmax family): Transformer-XL's memory length. Attentions with their own bound keep it
  (local: the window; adaptive span: the current span + ramp; ABC, Performer, S4D: their recurrent state);
  LongShort keeps its window and the compressed chunks of the last N tokens.
* ``--attn-position-bias alibi``: ALiBi on the causal self attentions that take it (``position_scheme ==
  "alibi"``: softmax, local, adaptive span, the entmax family, LongShort on its scores; Performer and ABC as a
  decay of their prefix sums), for models without absolute positions (``--no-token-positional-embeddings``),
  whose positions would restart every segment. S4D carries order in its state.
"""
from fairseq.utils import safe_getattr

from ..flag_types import IntRange
from ..modules.attention_base import FluenceAttention

POSITION_BIASES = ("none", "alibi")


def add_memory_args(parser) -> None:
    if "--mem-len" in getattr(parser, "_option_string_actions", {}):
        return
    parser.add_argument("--mem-len", type=IntRange(1, meaning="keys kept from earlier segments"), metavar="N", default=None,
                        help="keys/values of earlier segments kept by softmax and entmax attentions (Transformer-XL's "
                             "memory length), and LongShort's compressed chunks of the last N tokens; other attentions "
                             "keep their own bound [default: all, when decoding]")
    parser.add_argument("--attn-position-bias", choices=POSITION_BIASES, default=None,
                        help="relative position bias of the attentions that take one (alibi: Press et al. 2022); use "
                             "with --no-token-positional-embeddings for memory over a stream [default: none]")


def apply_memory_args(model, args) -> None:
    mem_len = safe_getattr(args, "mem_len", None)
    alibi = (safe_getattr(args, "attn_position_bias", None) or "none") == "alibi"
    for module in model.modules():
        if isinstance(module, FluenceAttention) and module.causal and not module.cross:
            module.set_mem_len(mem_len)
            if alibi and module.position_scheme == "alibi":
                module.set_alibi()
