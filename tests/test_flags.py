"""Every flag the plugin adds refuses nonsense when the arguments are parsed, with one line naming the flag and
what is valid; boundary values pass.

The flags are found, not listed: each command line below is parsed once with the fluence architecture and once
with its stock fairseq counterpart, and every flag the first has and the second lacks (plus the fairseq flags the
plugin restricts, such as ``--decoder-layerdrop``) is the plugin's. Each must declare its values: a
:class:`fluence_fairseq.flag_types.Domain` as its type (whose probes this test feeds it), ``choices``, or a switch.
A new attention option, memory, pruning or HEX flag joins the table by construction.
"""
import argparse
import contextlib
import io

import pytest

import fluence_fairseq  # noqa: F401  (registers the architectures)
from fairseq import options
from fluence_fairseq.flag_types import Domain

#: (fluence command line, the stock one it extends)
COMMAND_LINES = {
    "translation": (["--task", "translation", "--arch", "fluence_transformer"],
                    ["--task", "translation", "--arch", "transformer"]),
    "lm_stream": (["--task", "fluence_lm_stream", "--arch", "fluence_transformer_lm"],
                  ["--task", "language_modeling", "--arch", "transformer_lm"]),
    "hex": (["--task", "sentence_prediction", "--arch", "hex_classifier", "--criterion", "hex_sentence_prediction"],
            ["--task", "sentence_prediction", "--arch", "transformer", "--criterion", "sentence_prediction"]),
}
#: fairseq's own flags whose values the plugin restricts
RESTRICTED = {"translation": ["--encoder-layerdrop", "--decoder-layerdrop"], "lm_stream": ["--decoder-layerdrop"]}


def _parsers(argv):
    """Every argparse parser parse_args_and_arch builds for ``argv`` (it builds several)."""
    seen = []
    original = argparse.ArgumentParser.parse_known_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_known_args = spy
    try:
        options.parse_args_and_arch(options.get_training_parser(), ["data", *argv])
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return seen


def _actions(argv):
    out = {}
    for parser in _parsers(argv):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--"):
                    out[flag] = action
    return out


def plugin_flags():
    rows = []
    for line, (fluence, stock) in COMMAND_LINES.items():
        ours, theirs = _actions(fluence), _actions(stock)
        for flag in sorted(set(ours) - set(theirs)) + RESTRICTED.get(line, []):
            rows.append((line, fluence, flag, ours[flag]))
    return rows


FLAGS = plugin_flags()


def parse(argv):
    """(exit code or None, the last stderr line, the namespace)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = options.parse_args_and_arch(options.get_training_parser(), ["data", *argv])
        return None, "", args
    except SystemExit as exit:
        lines = err.getvalue().strip().splitlines()
        return exit.code, lines[-1] if lines else "", None


def test_the_table_found_the_plugin_flags():
    names = {flag for _, _, flag, _ in FLAGS}
    # one of each kind: attention option, memory, pruning, LayerDrop, HEX, role, task
    assert {"--attn-span", "--alpha-init", "--mem-len", "--attn-prune-tau", "--attn-patterns-self-enc",
            "--decoder-layerdrop", "--hex-ridge", "--decoder-self-attention", "--stream-without-memory"} <= names
    assert len(names) >= 40


@pytest.mark.parametrize("line,argv,flag,action", FLAGS, ids=[f"{line}:{flag}" for line, _, flag, _ in FLAGS])
def test_every_plugin_flag_declares_its_values(line, argv, flag, action):
    switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
    assert isinstance(action.type, Domain) or action.choices or switch, (
        f"{flag} ({line}) takes any {getattr(action.type, '__name__', action.type)}: give it a Domain from "
        "fluence_fairseq.flag_types (or choices) so bad values are refused when arguments are parsed")


DOMAIN_PROBES = [(line, argv, flag, action.type, kind, value)
                 for line, argv, flag, action in FLAGS if isinstance(action.type, Domain)
                 for kind, values in (("wrong_type", action.type.probes().wrong_type),
                                      ("out_of_range", action.type.probes().out_of_range),
                                      ("boundary", action.type.probes().boundary))
                 for value in values]


@pytest.mark.parametrize("line,argv,flag,domain,kind,value", DOMAIN_PROBES,
                         ids=[f"{p[0]}:{p[2]}={p[5]}({p[4]})" for p in DOMAIN_PROBES])
def test_plugin_flag_probe(line, argv, flag, domain, kind, value):
    code, message, args = parse([*argv, flag, value])
    if kind == "boundary":
        assert code is None, f"{flag} {value} is valid ({domain.describe()}) but was refused: {message}"
        dest = flag[2:].replace("-", "_")
        assert getattr(args, dest) == domain.convert(value)
    else:
        assert code == 2, f"{flag} {value} ({kind}) was accepted; valid: {domain.describe()}"
        assert "argument " in message and flag in message and domain.describe() in message and repr(value) in message, message


CHOICE_FLAGS = [(line, argv, flag, action) for line, argv, flag, action in FLAGS
                if action.choices and not isinstance(action.type, Domain)]


@pytest.mark.parametrize("line,argv,flag,action", CHOICE_FLAGS, ids=[f"{c[0]}:{c[2]}" for c in CHOICE_FLAGS])
def test_choice_flags_refuse_other_words_and_take_their_choices(line, argv, flag, action):
    code, message, _ = parse([*argv, flag, "nonsense"])
    assert code == 2 and "argument " in message and flag in message and "invalid choice" in message, message
    for choice in (list(action.choices)[0], list(action.choices)[-1]):
        code, message, args = parse([*argv, flag, str(choice)])
        assert code is None, message


@pytest.mark.parametrize("arch,attr,value,message", [
    ("transformer_adaptive_span_tiny", "decoder_layerdrop", 1.0, r"--decoder-layerdrop must be a number in \[0.0, 1.0\)"),
    ("transformer_lm_adaptive_span_tiny", "decoder_layerdrop", -0.2, r"--decoder-layerdrop must be a number in"),
    ("transformer_adaptive_span_tiny", "adapt_span_loss_coeff", -1e-6, r"adapt_span_loss_coeff must be >= 0"),
    ("transformer_alpha_entmax_tiny", "alpha_init", 3.0, r"alpha_init must be 'random' or a number in \[1.01, 2.0\)"),
])
def test_values_that_bypass_the_parser_are_checked_when_the_model_is_built(arch, attr, value, message):
    """``--model-overrides`` and the Python API do not go through argparse: building checks the same ranges."""
    from fairseq.models import build_model

    import fairseq_helpers as H

    H.build(arch)  # the defaults build
    args = H.model_args(arch)
    setattr(args, attr, value)
    with pytest.raises(ValueError, match=message):
        build_model(args, H.FluenceDummyTask(args))
