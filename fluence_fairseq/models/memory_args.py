"""Flags of language models that read a stream segment by segment (``--task fluence_lm_stream``).

* ``--mem-len N``: keys and values of the earlier segments kept by the attentions whose cache is otherwise
  unbounded (softmax, the entmax family): Transformer-XL's memory length. Attentions with their own bound keep it
  (local: the window; adaptive span: the current span + ramp; ABC, Performer, S4D: their recurrent state;
  LongShort: its window and compressed chunks).
* ``--attn-position-bias alibi``: ALiBi on the attentions whose scores take a relative bias (softmax, local,
  adaptive span, the entmax family), for models without absolute positions (``--no-token-positional-embeddings``),
  whose positions would restart every segment. The others carry order in their state.
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
                             "memory length; other attentions keep their own bound) [default: all, when decoding]")
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
