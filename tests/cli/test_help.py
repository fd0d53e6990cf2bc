"""fluence-help lists everything the plugin adds, found the way fairseq finds it, and --arch describes one."""
import pytest

from fluence_fairseq.cli import help as plugin_help


def test_help_lists_every_flag_criterion_and_architecture_the_plugin_adds(capsys):
    from fairseq.criterions import CRITERION_REGISTRY

    from test_flags import FLAGS

    plugin_help.main([])
    text = capsys.readouterr().out
    missing = sorted({flag for _, _, flag, _ in FLAGS if flag not in text})
    # the task's own flag is documented with the task (fairseq-train --task fluence_lm_stream --help shows it)
    assert missing in ([], ["--stream-without-memory"]), f"missing from fluence-help: {missing}"
    for name, cls in CRITERION_REGISTRY.items():
        if cls.__module__.startswith("fluence_fairseq."):
            assert name in text, name
    for arch in plugin_help.plugin_architectures():
        assert (arch in text) != arch.endswith("_tiny"), arch  # every user architecture, no test size
    assert "--decoder-layerdrop" in text and "[0, 1)" in text


def test_arch_prints_what_it_sets_and_unknown_names_are_refused(capsys):
    plugin_help.main(["--arch", "transformer_lm_adaptive_span"])
    text = capsys.readouterr().out
    assert text.startswith("--arch transformer_lm_adaptive_span: model fluence_transformer_lm")
    assert "--decoder-self-attention adaptive_span: --attn-span" in text and "--encoder-layers" not in text
    plugin_help.main(["--arch", "hex_classifier"])
    assert "--encoder-self-attention softmax" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plugin_help.main(["--arch", "transformer_nonsense"])
    assert "argument --arch: invalid choice: 'transformer_nonsense'" in capsys.readouterr().err
