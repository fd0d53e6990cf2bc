"""The package's public face: the pinned Python API, and an import without side effects beyond registration."""
import subprocess
import sys
import textwrap

import fairseq_helpers as H
import fluence_fairseq

#: the public API; a change here is a change of the package's interface (update the docs with it)
PUBLIC_API = {
    # the attention base and the registry
    "ALL_PATTERNS", "PATTERNS", "FluenceAttention", "Statistic", "UnsupportedPatternError", "fsmha",
    "ATTENTIONS", "AttentionOption", "AttentionSpec", "get_attention", "on_register", "register_attention",
    # the attentions: <Method>Attention and its @fsmha FS<Method>Attention
    "SoftmaxAttention", "FSSoftmaxAttention", "AdaptiveSpan", "AdaptiveSpanAttention", "FSAdaptiveSpanAttention",
    "EntmaxAttentionBase", "SparsemaxAttention", "Entmax15Attention", "AlphaEntmaxAttention",
    "FSSparsemaxAttention", "FSEntmax15Attention", "FSAlphaEntmaxAttention", "parse_alpha_init",
    "ABCAttention", "FSABCAttention", "CosformerAttention", "FSCosformerAttention", "LaraAttention",
    "FSLaraAttention", "LocalAttention", "FSLocalAttention", "LongShortAttention", "FSLongShortAttention",
    "NystromAttention", "FSNystromAttention", "PerformerAttention", "FSPerformerAttention", "ProbSparseAttention",
    "FSProbSparseAttention", "S4DAttention", "FSS4DAttention",
    # the names before 0.2, kept as aliases
    "FSSoftmax", "FSAdaptiveSpan", "FSSparsemax", "FSEntmax15", "FSAlphaEntmax", "ABC", "FSABC", "Lara", "FSLara",
    "LongShort", "FSLongShort", "Performer", "FSPerformer", "ProbSparse", "FSProbSparse", "S4D", "FSS4D",
    # models and utilities
    "EfficientTransformerEncoder", "LayerDrop",
    "AttentionRole", "ENCODER_SELF", "DECODER_SELF", "DECODER_CROSS", "ROLES",
}


def test_public_api_is_pinned():
    assert set(fluence_fairseq.__all__) == PUBLIC_API
    assert len(fluence_fairseq.__all__) == len(set(fluence_fairseq.__all__))
    assert all(getattr(fluence_fairseq, name) is not None for name in fluence_fairseq.__all__)


def test_every_attention_class_is_named_after_its_method_and_old_names_still_import():
    from fluence_fairseq.modules import ATTENTIONS

    for spec in ATTENTIONS.values():
        fs = spec.cls
        assert fs.__name__.startswith("FS") and fs.__name__.endswith("Attention"), fs.__name__
        assert fs.__mro__[1].__name__ == fs.__name__[2:], fs.__mro__[1].__name__
        module = fs.__module__.rsplit(".", 1)[-1]
        assert module == spec.name or (spec.family == "sparse" and module == "entmax"), fs.__module__
    assert fluence_fairseq.FSABC is fluence_fairseq.FSABCAttention and fluence_fairseq.S4D is fluence_fairseq.S4DAttention


def test_import_has_no_side_effects_beyond_registration():
    """No warnings filter, no optimizer hook and no changed torch defaults come with the import."""
    script = textwrap.dedent('''
        import warnings
        import torch
        from torch.optim import optimizer
        import fairseq.models, fairseq.tasks, fairseq.criterions  # their imports add warnings filters of their own
        filters = list(warnings.filters)
        hooks = len(optimizer._global_optimizer_post_hooks)
        dtype, threads, grad = torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()
        import fluence_fairseq
        from fairseq.models import ARCH_MODEL_REGISTRY
        assert "transformer_adaptive_span" in ARCH_MODEL_REGISTRY
        assert list(warnings.filters) == filters, "the import changed the warnings filters"
        assert len(optimizer._global_optimizer_post_hooks) == hooks, "the import registered an optimizer hook"
        assert (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()) == (dtype, threads, grad)
        # the adaptive-span clamp arrives with the first span, and leaves other optimizers' parameters alone
        other = torch.nn.Parameter(torch.full((3,), 5.0))
        span = fluence_fairseq.AdaptiveSpan(16, 0.0, 4, 0.5, True, 2)
        assert len(optimizer._global_optimizer_post_hooks) == hooks + 1
        with torch.no_grad():
            span.current_val.fill_(3.0)
        opt = torch.optim.SGD([other], lr=0.0)
        other.grad = torch.zeros(3)
        opt.step()
        assert float(span.current_val.max()) == 3.0 and float(other.max()) == 5.0  # not its optimizer
        span_opt = torch.optim.SGD(span.parameters(), lr=0.0)
        span.current_val.grad = torch.zeros_like(span.current_val)
        span_opt.step()
        assert float(span.current_val.max()) == 1.0  # clamped after its own optimizer's step
        print("OK")
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=H.REPO, capture_output=True, text=True,
                          env=H.clean_env(PYTHONWARNINGS=""))
    assert proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
