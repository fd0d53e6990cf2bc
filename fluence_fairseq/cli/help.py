"""``fluence-help``: the plugin's architectures, flags, criterions and attentions in one page.

``fairseq-train --help`` cannot show them: fairseq handles ``--help`` in its first parsing pass, before it adds
the flags of the chosen ``--arch``. This prints what fairseq would add, with each flag's help text and default.
``fluence-help --arch NAME`` prints what one architecture sets: its model, the attention of every role and the
values of their options and sizes. ``fluence-help --markdown`` prints the same as the Markdown reference page (``docs/reference.md``; ``make docs``
writes it and the support matrix of the README, and a test fails when the committed files differ).
"""
import argparse
import sys
from typing import List, Tuple

from ..models.architectures import markdown_table
from ..layerdrop import LAYERDROP_RATE
from ..models.attention_args import add_attention_args
from ..models.encoder_decoder import FluenceTransformerModel
from ..models.hex_classifier import HexClassifierModel
from ..models.language_model import FluenceTransformerLanguageModel
from ..models.memory_args import add_memory_args
from ..modules.attention_base import ALL_PATTERNS, PATTERNS
from ..modules.registry import ATTENTIONS
from ..pruning.flags import add_pruning_args

ATTENTION_GROUP = "attention flags"
PRUNING_GROUP = "attention pruning flags"
HEX_GROUP = "hex_classifier flags"
MEMORY_GROUP = "language model memory flags"
LAYERDROP_GROUP = "LayerDrop flags"
#: the model of every architecture the plugin registers
PLUGIN_MODELS = ("fluence_transformer", "fluence_transformer_lm", "hex_classifier")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluence-help",
        description="Flags that --user-dir fluence_fairseq adds to fairseq-train/-generate for its models "
        "(besides fairseq's own transformer flags), its criterions and its architectures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"criterions (--criterion):\n{criterions_table()}\n\narchitectures (--arch):\n{markdown_table()}"
               f"\n\nhex_classifier architectures (--task sentence_prediction): {', '.join(hex_architectures())}",
    )
    parser.add_argument("--markdown", action="store_true", help="print the Markdown reference page instead")
    parser.add_argument("--arch", choices=plugin_architectures(), metavar="NAME",
                        help="print what this architecture sets (model, attention per role, option values, sizes)")
    group = parser.add_argument_group(
        ATTENTION_GROUP, "fluence_transformer has all three roles, fluence_transformer_lm only the decoder self "
        "attention; an option applies where its attention is chosen")
    for model, name in ((FluenceTransformerModel, "fluence_transformer"),
                        (FluenceTransformerLanguageModel, "fluence_transformer_lm")):
        add_attention_args(group, model.ATTENTION_ROLES, name)  # flags already added are skipped
    add_pruning_args(parser.add_argument_group(
        PRUNING_GROUP, "every fluence architecture; pattern files from fluence-attn-score"))
    add_memory_args(parser.add_argument_group(
        MEMORY_GROUP, "fluence_transformer_lm and transformer_lm_*, for --task fluence_lm_stream"))
    HexClassifierModel.add_args(parser.add_argument_group(
        HEX_GROUP, "--arch hex_classifier*, --task sentence_prediction"))
    add_layerdrop_help(parser.add_argument_group(
        LAYERDROP_GROUP, "fairseq's own flags on every fluence encoder-decoder and language model; the plugin checks "
        "their values and prunes by its own rules (see layerdrop.md)"))
    return parser


def add_layerdrop_help(group) -> None:
    for side in ("encoder", "decoder"):
        group.add_argument(f"--{side}-layerdrop", type=LAYERDROP_RATE, metavar="P",
                           help=f"probability of skipping each {side} layer in training, in [0, 1) [default: 0]")
        group.add_argument(f"--{side}-layers-to-keep", metavar="I,J,...",
                           help=f"0-based {side} layers to keep when loading (prunes a LayerDrop-trained model; also "
                                "as --model-overrides) [default: all]")


def plugin_architectures() -> List[str]:
    """Every --arch the plugin registers (test sizes included: they are valid names)."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return sorted(name for name, model in ARCH_MODEL_NAME_REGISTRY.items() if model in PLUGIN_MODELS)


def hex_architectures() -> List[str]:
    return [a for a in plugin_architectures() if a.startswith("hex_classifier") and not a.endswith("_tiny")]


def describe_architecture(name: str) -> str:
    """What ``--arch name`` sets, resolved the way fairseq-train resolves it (the arch function on empty args)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY

    from ..models.attention_args import attention_name

    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[name](args)
    model = ARCH_MODEL_NAME_REGISTRY[name]
    model_roles = {FluenceTransformerModel: "fluence_transformer", FluenceTransformerLanguageModel:
                   "fluence_transformer_lm", HexClassifierModel: "hex_classifier"}
    roles = next(cls.ATTENTION_ROLES for cls, m in model_roles.items() if m == model)
    sides = {"fluence_transformer": ("encoder", "decoder"), "fluence_transformer_lm": ("decoder",),
             "hex_classifier": ("encoder",)}[model]
    lines = [f"--arch {name}: model {model}"]
    for role in roles:
        attention = attention_name(args, role)
        options = ", ".join(f"--{o.name.replace('_', '-')} {getattr(args, o.name, o.default)}"
                            for o in ATTENTIONS[attention].options) or "no options"
        lines.append(f"  {role.flag} {attention}: {options}")
    sizes = [k for k in ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "encoder_ffn_embed_dim",
                         "decoder_layers", "decoder_embed_dim", "decoder_attention_heads", "decoder_ffn_embed_dim",
                         "encoder_layerdrop", "decoder_layerdrop")
             if getattr(args, k, None) is not None and k.split("_")[0] in sides]
    if sizes:
        lines.append("  " + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in sizes))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- tables
def criterions() -> List[Tuple[str, str]]:
    """(name, first docstring line) of every criterion the plugin registers."""
    from fairseq.criterions import CRITERION_REGISTRY

    def summary(cls) -> str:
        first = (cls.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(line.strip() for line in first.splitlines()).replace("``", "`")

    return [(name, summary(cls)) for name, cls in sorted(CRITERION_REGISTRY.items())
            if cls.__module__.startswith("fluence_fairseq.")]


def criterions_table() -> str:
    return "\n".join(["| --criterion | what it adds |", "|---|---|"]
                     + [f"| `{name}` | {doc} |" for name, doc in criterions()])


def _mark(supported: bool) -> str:
    return "✓" if supported else "—"


def _memory(cls) -> str:
    if (False, True) not in cls.supported_patterns:
        return "—"
    if not cls.supports_memory:
        return "refused"
    return "✓ (bounded by `--mem-len`)" if cls.memory_grows() else "✓ (its decoding state)"


def _weights(cls) -> str:
    if not cls.forms_weights:
        return "—"
    kind = "sparse" if cls.sparse_weights else "✓"
    return kind if cls.weights_by_default else f"{kind} (on request)"


def support_matrix() -> str:
    """Which patterns, masks, weights and decoding state every registered attention has, from what it declares."""
    order = sorted(ALL_PATTERNS)
    header = ["attention", "classes", *(PATTERNS[p] for p in order), "`attn_mask` / pruning", "weights",
              "decoding state (batch on dim 0)", "memory over a stream", "positions with memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, spec in ATTENTIONS.items():
        cls = spec.cls
        state = cls.decoding_state + (" (constant size)" if cls.constant_state else "")
        cells = [f"`{name}` ({spec.family})", f"`{cls.__mro__[1].__name__}`, `{cls.__name__}`",
                 *(_mark(p in cls.supported_patterns) for p in order), _mark(cls.supports_attn_mask),
                 _weights(cls), state, _memory(cls),
                 cls.position_scheme if (False, True) in cls.supported_patterns else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flags_table(parser: argparse.ArgumentParser, title: str) -> str:
    group = next(g for g in parser._action_groups if g.title == title)
    lines = ["| flag | meaning (defaults come from the `--arch`, else as stated) |", "|---|---|"]
    for action in group._group_actions:
        flags = " / ".join(f"`{f}`" for f in action.option_strings)
        text = (action.help or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {flags} | {text} |")
    return "\n".join(lines)


def reference_markdown() -> str:
    parser = build_parser()
    return "\n\n".join([
        "# Reference: attentions, architectures, criterions and flags",
        "Generated from the registry by `make docs` (`fluence-help --markdown`); do not edit by hand.",
        "## Support matrix",
        "✓ supported; — not defined for the method (building it raises `UnsupportedPatternError` naming the "
        "supported patterns). `attn_mask` / pruning: an arbitrary `attn_mask` and the global masks of attention "
        "pruning are applied (— : refused with a clear error; the standard future mask of a causal self attention "
        "is always accepted). Weights: `need_weights` returns attention probabilities (sparse: with exact zeros); "
        "*on request*: only with `need_head_weights=True` (or a pattern recorder), since they would cost an extra "
        "O(Lq x Lk) pass; a plain `need_weights=True` (fairseq's default) returns None there and runs exactly the "
        "`need_weights=False` computation. "
        "Memory over a stream: what a causal self attention carries from one segment to the next with "
        "`--task fluence_lm_stream` (see long_context.md); positions with memory: `alibi` "
        "(`--attn-position-bias alibi`), `state` (a recurrent state carries the order), or what the method has.",
        support_matrix(),
        "## Architectures (`--arch`)",
        "Every attention also has `transformer_<name>_tiny` (and `transformer_lm_<name>_tiny`) test sizes, "
        "registered but not listed.",
        markdown_table(),
        "## Criterions (`--criterion`)",
        criterions_table(),
        "## Attention flags",
        flags_table(parser, ATTENTION_GROUP),
        "## Attention pruning flags",
        flags_table(parser, PRUNING_GROUP),
        "## Language model memory flags",
        "With `--task fluence_lm_stream` (see long_context.md), which adds `--stream-without-memory`.",
        flags_table(parser, MEMORY_GROUP),
        "## hex_classifier flags",
        "Architectures: " + ", ".join(f"`{a}`" for a in hex_architectures()) + ".",
        flags_table(parser, HEX_GROUP),
        "## LayerDrop flags",
        flags_table(parser, LAYERDROP_GROUP),
    ]) + "\n"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(reference_markdown())
    elif args.arch:
        print(describe_architecture(args.arch))
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
