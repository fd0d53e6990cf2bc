"""``python -m fluence_fairseq.cli.help``: the plugin's architectures, flags and criterions in one page.

``fairseq-train --help`` cannot show them: fairseq handles ``--help`` in its first parsing pass, before it adds
the flags of the chosen ``--arch``. This prints what fairseq would add, with each flag's help text and default.
"""
import argparse
import sys

from ..models.architectures import markdown_table
from ..models.attention_args import add_attention_args
from ..models.encoder_decoder import FluenceTransformerModel
from ..models.language_model import FluenceTransformerLanguageModel
from ..pruning.flags import add_pruning_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fluence_fairseq.cli.help",
        description="Flags that --user-dir fluence_fairseq adds to fairseq-train/-generate for its models "
        "(besides fairseq's own transformer flags). Criterions: adaptive_span_label_smoothed_cross_entropy, "
        "adaptive_span_cross_entropy (same options as label_smoothed_cross_entropy / cross_entropy).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="architectures (--arch):\n" + markdown_table(),
    )
    group = parser.add_argument_group(
        "attention flags (fluence_transformer has all three roles, fluence_transformer_lm only the decoder self "
        "attention)"
    )
    for model, name in ((FluenceTransformerModel, "fluence_transformer"),
                        (FluenceTransformerLanguageModel, "fluence_transformer_lm")):
        add_attention_args(group, model.ATTENTION_ROLES, name)  # flags already added are skipped
    add_pruning_args(parser.add_argument_group(
        "attention pruning flags (every fluence architecture; patterns from python -m fluence_fairseq.compute_attn_score)"
    ))
    return parser


def main(argv=None):
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
