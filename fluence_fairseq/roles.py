"""The three attention roles of a fairseq transformer, named once.

Every place that has to tell an encoder self attention from a decoder self attention or a cross attention reads
the names from here: the model flag (``--encoder-self-attention``), the pattern-file and pruning-flag name
(``self-enc``: ``self-enc.npy``, ``--attn-patterns-self-enc``), the label of logged statistics and plots
(``enc_self``: ``alpha_enc_self_2``, ``density_enc_self_2``) and where the attention sits in a fairseq model
(``encoder.layers.<n>.self_attn``).
"""
import re
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class AttentionRole:
    """One attention sublayer of a transformer and every name it goes by."""

    attr: str  # argparse dest of the flag that chooses its attention, e.g. "decoder_self_attention"
    causal: bool
    cross: bool
    what: str  # for help texts and errors
    title: str  # short name for plot titles and tables
    pattern_name: str  # pattern files (<pattern_name>.npy) and pruning flags (--attn-patterns-<pattern_name>)
    label: str  # logged statistics and plots (<stat>_<label>_<layer>)
    stack: str  # "encoder" or "decoder": the module path is <stack>.layers.<n>.<sublayer>
    sublayer: str  # "self_attn" or "encoder_attn"
    aliases: Tuple[str, ...] = ()  # older argparse dests that mean the same (read from old checkpoints too)

    @property
    def flag(self) -> str:
        return "--" + self.attr.replace("_", "-")

    @property
    def flags(self) -> Tuple[str, ...]:
        return (self.flag,) + tuple("--" + a.replace("_", "-") for a in self.aliases)

    @property
    def pattern(self) -> Tuple[bool, bool]:
        """(cross, causal): the attention pattern the role needs."""
        return (self.cross, self.causal)

    def module_path(self, layer: int) -> str:
        return f"{self.stack}.layers.{layer}.{self.sublayer}"


ENCODER_SELF = AttentionRole("encoder_self_attention", causal=False, cross=False, what="encoder self attention",
                             title="encoder self", pattern_name="self-enc", label="enc_self", stack="encoder", sublayer="self_attn")
DECODER_SELF = AttentionRole("decoder_self_attention", causal=True, cross=False, what="decoder self attention",
                             title="decoder self", pattern_name="self-dec", label="dec_self", stack="decoder", sublayer="self_attn")
DECODER_CROSS = AttentionRole("cross_attention", causal=False, cross=True,
                              what="decoder cross (encoder-decoder) attention", title="cross", pattern_name="enc-dec",
                              label="cross", stack="decoder", sublayer="encoder_attn",
                              aliases=("decoder_cross_attention",))

#: every role, in model order
ROLES: Tuple[AttentionRole, ...] = (ENCODER_SELF, DECODER_SELF, DECODER_CROSS)
BY_PATTERN_NAME = {role.pattern_name: role for role in ROLES}
BY_LABEL = {role.label: role for role in ROLES}

# encoder.layers.3.self_attn, decoder.layers.0.encoder_attn (wrappers such as FSDP may add path segments)
_PATH = re.compile(r"(?:^|\.)(?P<stack>{})\.(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?(?P<sublayer>{})$".format(
    "|".join(sorted({r.stack for r in ROLES})), "|".join(sorted({r.sublayer for r in ROLES}))))


def role_at(path: str) -> Optional[Tuple[AttentionRole, int]]:
    """The role and layer number of the attention at module path ``path`` (None if it is not one)."""
    match = _PATH.search(path)
    if match is None:
        return None
    for role in ROLES:
        if role.stack == match["stack"] and role.sublayer == match["sublayer"]:
            return role, int(match["layer"])
    return None  # e.g. encoder.layers.0.encoder_attn: no such role


def attention_label(path: str) -> Optional[str]:
    """``encoder.layers.2.self_attn`` -> ``enc_self_2``; ``decoder.layers.0.encoder_attn`` -> ``cross_0``."""
    found = role_at(path)
    return None if found is None else f"{found[0].label}_{found[1]}"


def split_label(label: str) -> Tuple[AttentionRole, int]:
    """``enc_self_2`` -> (ENCODER_SELF, 2)."""
    name, layer = label.rsplit("_", 1)
    return BY_LABEL[name], int(layer)
