"""fluence models in memory: architectures, flags, state dicts, incremental decoding, beam search, checkpoints,
the span-loss criterions and the span clamp."""
import argparse

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.logging import metrics
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY, ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq.optim import build_optimizer
from fairseq.sequence_generator import SequenceGenerator

import fairseq_helpers as H
from fluence_fairseq.criterions import (
    AdaptiveSpanCrossEntropyCriterion,
    AdaptiveSpanLabelSmoothedCrossEntropyCriterion,
    span_loss,
)
from fluence_fairseq.models import (
    ARCHITECTURES,
    Architecture,
    FluenceTransformerDecoder,
    FluenceTransformerLanguageModel,
    FluenceTransformerModel,
    markdown_table,
    register_architecture,
)
from fluence_fairseq.models import architectures as arch_module
from fluence_fairseq.modules import AdaptiveSpan, FluenceAttention, FSSoftmax
from fluence_fairseq.modules.registry import ATTENTIONS, AttentionOption, AttentionSpec

ROLE_PATTERNS = {  # module name suffix -> (role, causal, cross)
    "encoder_self": ("encoder_self_attention", False, False),
    "decoder_self": ("decoder_self_attention", True, False),
    "decoder_cross": ("cross_attention", False, True),
}


def role_of(name):
    if name.startswith("encoder.") and name.endswith("self_attn"):
        return "encoder_self"
    if name.startswith("decoder.") and name.endswith("self_attn"):
        return "decoder_self"
    if name.startswith("decoder.") and name.endswith("encoder_attn"):
        return "decoder_cross"
    raise AssertionError(f"unexpected attention module {name}")


def attentions(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FluenceAttention)}


# ----------------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("arch", [a.name for a in ARCHITECTURES])
def test_every_architecture_builds_with_the_right_attentions(arch):
    row = next(a for a in ARCHITECTURES if a.name == arch)
    # big rows: keep their attention choices and options, shrink the sizes (building 60M parameters is slow)
    small = [] if arch.endswith("_tiny") else ["--decoder-layers", "2", "--decoder-embed-dim", "32",
                                               "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2"]
    if row.model == "fluence_transformer" and small:
        small += ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "32",
                  "--encoder-attention-heads", "2"]
    model, task, args = H.build(arch, small)
    expected_cls = FluenceTransformerModel if row.model == "fluence_transformer" else FluenceTransformerLanguageModel
    assert type(model) is expected_cls
    assert type(model.decoder) is FluenceTransformerDecoder
    found = attentions(model)
    n_dec = args.decoder_layers
    n_enc = getattr(args, "encoder_layers", 0) if row.model == "fluence_transformer" else 0
    assert len(found) == n_enc + 2 * n_dec if row.model == "fluence_transformer" else n_dec
    for name, module in found.items():
        role, causal, cross = ROLE_PATTERNS[role_of(name)]
        assert type(module) is ATTENTIONS[row.attention[role]].cls, name
        assert (module.causal, module.cross) == (causal, cross), name
    # the row's own defaults win over fairseq's base architecture
    overridden = {f[2:].replace("-", "_") for f in small[::2]}
    for key, value in row.defaults.items():
        assert getattr(args, key) == value or key in overridden, key
    # decoders with causal-by-construction self attention build no O(L^2) future mask
    assert model.decoder.self_attention_is_causal
    assert model.decoder.buffered_future_mask(torch.zeros(5, 2, 8)) is None


def test_arch_defaults_match_the_table():
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY["transformer_lm_adaptive_span"](args)
    assert (args.decoder_layers, args.decoder_embed_dim, args.decoder_attention_heads, args.decoder_ffn_embed_dim) \
        == (8, 256, 4, 1024)
    assert args.attn_span == 1024 and args.decoder_self_attention == "adaptive_span"
    assert args.adapt_span_ramp == 32  # registry default filled in, so it is stored in checkpoints
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY["transformer_adaptive_span"](args)
    assert (args.encoder_layers, args.encoder_embed_dim, args.encoder_attention_heads) == (6, 512, 8)
    assert (args.encoder_self_attention, args.decoder_self_attention, args.cross_attention) \
        == ("adaptive_span", "adaptive_span", "softmax")
    # command-line values are kept
    args = argparse.Namespace(attn_span=7, decoder_layers=1)
    ARCH_CONFIG_REGISTRY["transformer_adaptive_span_small"](args)
    assert args.attn_span == 7 and args.decoder_layers == 1 and args.encoder_layers == 3
    table = markdown_table()
    assert all((f"`{a.name}`" in table) != a.for_tests for a in ARCHITECTURES)  # the test sizes are hidden
    assert any(a.for_tests for a in ARCHITECTURES)


@pytest.mark.parametrize("arch", ["transformer_adaptive_span_tiny", "transformer_lm_adaptive_span_tiny"])
def test_attention_option_flags_reach_every_adaptive_span(arch):
    model, _, _ = H.build(arch, ["--attn-span", "77", "--adapt-span-init", "0.25", "--adapt-span-ramp", "5"])
    spans = [m for m in model.modules() if isinstance(m, AdaptiveSpan)]
    assert len(spans) == (4 if "lm" not in arch else 2)
    for span in spans:
        assert span.attn_span == 77 and span.ramp == 5
        torch.testing.assert_close(span.current_val.detach(), torch.full_like(span.current_val, 0.25))


def test_role_flags_switch_attentions_and_reject_impossible_patterns():
    model, _, _ = H.build("transformer_adaptive_span_tiny", ["--encoder-self-attention", "softmax"])
    kinds = {role_of(n): type(m).__name__ for n, m in attentions(model).items()}
    assert kinds == {"encoder_self": "FSSoftmaxAttention", "decoder_self": "FSAdaptiveSpanAttention", "decoder_cross": "FSSoftmaxAttention"}
    with pytest.raises(ValueError, match="cross-attention adaptive_span.*noncausal cross"):
        H.build("transformer_adaptive_span_tiny", ["--cross-attention", "adaptive_span"])
    with pytest.raises(SystemExit):  # argparse: not a registered attention
        H.model_args("transformer_adaptive_span_tiny", ["--encoder-self-attention", "nope"])


def test_help_lists_every_flag_with_its_default():
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    FluenceTransformerModel.add_args(parser)
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert actions["--cross-attention"].option_strings == ["--cross-attention", "--decoder-cross-attention"]
    for flag in ("--encoder-self-attention", "--decoder-self-attention", "--cross-attention"):
        assert "default" in actions[flag].help and set(actions[flag].choices) == set(ATTENTIONS)
    for spec in ATTENTIONS.values():
        for opt in spec.options:
            action = actions["--" + opt.name.replace("_", "-")]
            assert f"default: {opt.default}" in action.help or f"{spec.name}={opt.default}" in action.help, action.help
    lm_parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    FluenceTransformerLanguageModel.add_args(lm_parser)
    lm_flags = {s for a in lm_parser._actions for s in a.option_strings}
    assert {"--decoder-self-attention", "--attn-span", "--decoder-layers"} <= lm_flags
    assert "--encoder-self-attention" not in lm_flags


class KnobSoftmax(FSSoftmax):
    def __init__(self, *args, fake_knob: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.fake_knob = fake_knob


def test_a_new_registry_row_and_arch_row_are_picked_up(monkeypatch):
    spec = AttentionSpec("knob_softmax", KnobSoftmax, (AttentionOption("fake_knob", int, 1, "a test knob"),))
    monkeypatch.setitem(ATTENTIONS, "knob_softmax", spec)
    monkeypatch.setattr(arch_module, "ARCHITECTURES", list(ARCHITECTURES))
    name = "fluence_test_knob_tiny"
    row = Architecture(name, "fluence_transformer", {"encoder_self_attention": "knob_softmax"},
                       {**arch_module.sizes(1, 16, 2, 16), "fake_knob": 5})
    register_architecture(row)
    try:
        model, _, _ = H.build(name, [])
        enc = [m for n, m in attentions(model).items() if role_of(n) == "encoder_self"]
        assert [type(m) for m in enc] == [KnobSoftmax] and enc[0].fake_knob == 5
        model, _, _ = H.build(name, ["--fake-knob", "9", "--decoder-self-attention", "knob_softmax"])
        knobs = [m for m in attentions(model).values() if isinstance(m, KnobSoftmax)]
        assert len(knobs) == 2 and all(m.fake_knob == 9 for m in knobs)
        assert all(m.causal for n, m in attentions(model).items() if role_of(n) == "decoder_self")
    finally:
        for registry in (ARCH_MODEL_REGISTRY, ARCH_MODEL_NAME_REGISTRY, ARCH_CONFIG_REGISTRY):
            registry.pop(name, None)
        ARCH_MODEL_INV_REGISTRY["fluence_transformer"].remove(name)


# ----------------------------------------------------------------------------------------- state dicts
def test_attention_parameters_keep_fairseq_names():
    model, _, _ = H.build("transformer_adaptive_span_tiny")
    keys = set(model.state_dict())
    for name, module in attentions(model).items():
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert {f"{name}.{proj}.weight", f"{name}.{proj}.bias"} <= keys
        if isinstance(getattr(module, "adaptive_span", None), AdaptiveSpan):
            assert f"{name}.adaptive_span.current_val" in keys


def test_softmax_model_matches_stock_transformer_weights_and_outputs():
    """The softmax-only fluence model is state-dict compatible with fairseq's stock transformer and computes the
    same function (our decoder relies on causal=True instead of the future mask)."""
    flags = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32",
             "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
             "--dropout", "0"]
    ours, task, _ = H.build("fluence_transformer", flags)
    stock, _, _ = H.build("transformer", flags, task=task, seed=1)
    stock.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), stock.eval()
    sample = H.translation_sample(task)
    torch.testing.assert_close(ours(**sample["net_input"])[0], stock(**sample["net_input"])[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- incremental decoding
def _set_spans(model, values=(0.05, 0.2, 0.4, 0.1)):
    with torch.no_grad():
        for span in model.modules():
            if isinstance(span, AdaptiveSpan):
                span.current_val.copy_(torch.tensor(values[: span.nb_heads]).view(-1, 1, 1))


def test_incremental_decoding_equals_full_forward_encoder_decoder():
    model, task, _ = H.build("transformer_adaptive_span_tiny")
    _set_spans(model)  # windows of 9..20 keys: the span mask and the cache trimming are active at length 14
    model.eval()
    sample = H.translation_sample(task, tgt_len=14)
    net = sample["net_input"]
    with torch.no_grad():
        full = model(**net)[0]
        enc = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
        state = {}
        steps = [model.decoder(net["prev_output_tokens"][:, : t + 1], enc, incremental_state=state)[0][:, -1]
                 for t in range(full.size(1))]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_equals_full_forward_lm():
    model, task, _ = H.build("transformer_lm_adaptive_span_tiny")
    _set_spans(model)
    model.eval()
    tokens = H.lm_sample(task, length=16)["net_input"]["src_tokens"]
    with torch.no_grad():
        full = model(tokens)[0]
        state = {}
        steps = [model.decoder(tokens[:, : t + 1], incremental_state=state)[0][:, -1] for t in range(tokens.size(1))]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_beam_search_reorders_the_cache_and_scores_match_a_full_forward(monkeypatch):
    model, task, _ = H.build("transformer_adaptive_span_tiny")
    _set_spans(model)
    model.eval()
    calls = []
    original = FluenceAttention.reorder_incremental_state

    def counting(self, incremental_state, new_order):
        calls.append(type(self).__name__)
        return original(self, incremental_state, new_order)

    monkeypatch.setattr(FluenceAttention, "reorder_incremental_state", counting)
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=12, min_len=5)
    sample = H.translation_sample(task)
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    assert len(hypos) == 3 and all(len(h) == 3 for h in hypos)
    assert {"FSAdaptiveSpanAttention", "FSSoftmaxAttention"} <= set(calls)
    # the best hypothesis' per-token scores equal a teacher-forced full forward of it (beam reordering was right)
    eos = task.target_dictionary.eos()
    net = sample["net_input"]
    for b, beams in enumerate(hypos):
        best = beams[0]["tokens"]
        prev = torch.cat([torch.tensor([eos]), best[:-1]]).unsqueeze(0)
        with torch.no_grad():
            out = model(net["src_tokens"][b: b + 1], net["src_lengths"][b: b + 1], prev)
            lprobs = model.get_normalized_probs(out, log_probs=True)[0]
        expected = lprobs.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(beams[0]["positional_scores"], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["fluence_transformer_tiny", "transformer_entmax15_tiny"])
def test_beam_search_leaves_the_shared_source_cache_and_finds_the_same_hypotheses(arch, monkeypatch):
    """In fairseq's beam search a sentence's beams share its source: the cross attentions project and cache it once
    per sentence, attend it with the sentence's beams together and keep it through each step's reorder instead of
    copying it, and the encoder's output is not copied by reorders within the beams; the hypotheses and their
    scores are those of every beam projecting, caching and reading its own copy, copied at every reorder."""
    from fairseq.models.transformer import TransformerEncoder

    from fluence_fairseq.models.layers import FluenceTransformerEncoder
    model, task, _ = H.build(arch)
    model.eval()
    sample = H.translation_sample(task)
    copies = []
    original = torch.Tensor.index_select

    def generate():
        copies.clear()
        generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=12, min_len=5)
        with torch.no_grad():
            return generator.generate([model], sample)

    projected = []
    cross = [m for m in model.modules() if isinstance(m, FluenceAttention) and m.cross]
    for m in cross:
        m.k_proj.register_forward_hook(lambda mod, args, out: projected.append(args[0].size(1)))
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *a: copies.append(t.shape) or original(t, *a))
    kept = generate()
    kept_copies, kept_rows = len(copies), sum(projected)
    assert set(projected) == {len(sample["net_input"]["src_tokens"])}  # one row per sentence, not per beam
    projected.clear()
    monkeypatch.setattr(FluenceAttention, "_cache_shared_source", lambda self, *args: None)
    monkeypatch.setattr(FluenceTransformerEncoder, "reorder_encoder_out", TransformerEncoder.reorder_encoder_out)
    copied = generate()
    assert kept_copies < len(copies) and kept_rows * 3 == sum(projected)
    for beams_kept, beams_copied in zip(kept, copied):
        for a, b in zip(beams_kept, beams_copied):
            assert torch.equal(a["tokens"], b["tokens"])
            torch.testing.assert_close(a["positional_scores"], b["positional_scores"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["fluence_transformer_tiny", "transformer_sparsemax_tiny"])
def test_beam_search_with_the_reorder_left_to_the_step_finds_the_same_hypotheses(arch, monkeypatch):
    """fairseq's beam search reorders the decoder's self attentions' cached keys before every step; the steps take
    the reorder over (a pending order in the cache, selected as the keys are appended) and find the hypotheses and
    scores of a search whose every reorder copies the keys at once, through finished sentences."""
    model, task, _ = H.build(arch)
    model.eval()
    sample = H.translation_sample(task)
    pending = []
    original = FluenceAttention.reorder_incremental_state

    def recording(self, incremental_state, new_order):
        result = original(self, incremental_state, new_order)
        if not self.cross:
            pending.append("pending_order" in self._get_input_buffer(incremental_state))
        return result

    monkeypatch.setattr(FluenceAttention, "reorder_incremental_state", recording)

    def generate():
        generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=12, min_len=2)
        with torch.no_grad():
            return generator.generate([model], sample)

    deferred = generate()
    assert pending and all(pending)
    pending.clear()
    monkeypatch.setattr(FluenceAttention, "_defers_reorder", lambda self, buffer: False)
    eager = generate()
    assert pending and not any(pending)
    for beams_deferred, beams_eager in zip(deferred, eager):
        for a, b in zip(beams_deferred, beams_eager):
            assert torch.equal(a["tokens"], b["tokens"])
            torch.testing.assert_close(a["positional_scores"], b["positional_scores"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("arch", ["transformer_adaptive_span_tiny", "transformer_lm_adaptive_span_tiny"])
def test_checkpoint_roundtrip_through_fairseq_loading(tmp_path, arch):
    model, task, args = H.build(arch, ["--attn-span", "40", "--adapt-span-init", "0.1"])
    _set_spans(model)
    path = tmp_path / "checkpoint.pt"
    # what fairseq's trainer stores for a legacy model: the argparse namespace as cfg.model
    state = {
        "args": None,
        "cfg": {"model": args, "task": {"_name": "dummy"}, "common": {"user_dir": "fluence_fairseq"}},
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {"best": None},
                               "num_updates": 3}],
        "extra_state": {},
    }
    checkpoint_utils.torch_persistent_save(state, str(path))
    torch.load(path, weights_only=True)  # loads under weights-only protection (argparse.Namespace is allowed)
    raw = checkpoint_utils.load_checkpoint_to_cpu(str(path))  # fairseq's load: torch's default (weights_only) load
    assert isinstance(raw["cfg"]["model"], argparse.Namespace)
    (loaded,), _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
    assert type(loaded) is type(model)
    model.eval(), loaded.eval()
    sample = H.translation_sample(task) if "lm" not in arch else H.lm_sample(task)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**sample["net_input"])[0], model(**sample["net_input"])[0],
                                   atol=0, rtol=0)
    for a, b in zip(loaded.modules(), model.modules()):
        if isinstance(a, AdaptiveSpan):
            assert (a.attn_span, a.ramp) == (b.attn_span, b.ramp) == (40, 8)


# ------------------------------------------------------------------------------------------- criterions
def _criterion_losses(criterion, model, sample):
    model.train()
    loss_train, size_train, log_train = criterion(model, sample)
    model.eval()
    loss_eval, size_eval, log_eval = criterion(model, sample)
    assert size_train == size_eval
    return loss_train, loss_eval, size_train, log_train, log_eval


@pytest.mark.parametrize("kind", ["label_smoothed", "lm"])
def test_span_loss_is_added_in_training_only(kind):
    if kind == "lm":
        model, task, _ = H.build("transformer_lm_adaptive_span_tiny", ["--dropout", "0", "--adapt-span-init", "0.3",
                                                                       "--adapt-span-loss-coeff", "0.01"])
        criterion = AdaptiveSpanCrossEntropyCriterion(task, sentence_avg=False)
        sample = H.lm_sample(task)
    else:
        model, task, _ = H.build("transformer_adaptive_span_tiny", ["--dropout", "0", "--adapt-span-init", "0.3",
                                                                    "--adapt-span-loss-coeff", "0.01"])
        criterion = AdaptiveSpanLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
        sample = H.translation_sample(task)
    loss_train, loss_eval, sample_size, log_train, log_eval = _criterion_losses(criterion, model, sample)
    regulariser = span_loss(model)
    assert regulariser.item() > 0
    torch.testing.assert_close(loss_train - loss_eval, regulariser.detach() * sample_size, atol=1e-4, rtol=1e-5)
    # the logged loss is the plain criterion's in both modes
    torch.testing.assert_close(log_train["loss"], log_eval["loss"])
    torch.testing.assert_close(log_train["loss"], loss_eval.detach())
    assert abs(float(log_train["span_loss__sum"]) - regulariser.item()) < 1e-7
    # gradients reach the span parameters through the added loss
    model.train()
    model.zero_grad()
    criterion(model, sample)[0].backward()
    assert all(m.current_val.grad is not None and m.current_val.grad.abs().sum() > 0
               for m in model.modules() if isinstance(m, AdaptiveSpan))


def test_span_metrics_are_averaged_not_summed():
    model, task, _ = H.build("transformer_adaptive_span_tiny", ["--adapt-span-init", "0.5"])
    criterion = AdaptiveSpanLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    _, _, log = criterion(model, H.translation_sample(task))
    spans = [m for m in model.modules() if isinstance(m, AdaptiveSpan)]
    average = sum(s.get_current_avg_span() for s in spans) / len(spans)
    assert max(s.get_current_max_span() for s in spans) == 16 + 8  # 0.5 * 32 + ramp
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics([log])
        one = agg.get_smoothed_values()
    assert one["span_avg"] == round(average, 1) and one["span_max"] == 24
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics([log, log, log])
        values = agg.get_smoothed_values()
    assert values["span_max"] == 24 and values["span_avg"] == round(average, 1)
    assert {"loss", "nll_loss", "ppl", "span_loss"} <= set(values)
    # two workers' outputs summed into double tensors before reduce_metrics (fairseq's fast stat sync when
    # logging_outputs_can_be_summed) still average right, and stay plain floats for the progress bar
    summed = {k: torch.tensor(float(v), dtype=torch.double) * 2 for k, v in log.items()}
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics([summed])
        values = agg.get_smoothed_values()
    assert values["span_max"] == 24 and type(values["span_max"]) is float
    assert type(values["span_loss"]) is float and values["span_loss"] == pytest.approx(float(log["span_loss__sum"]))


def test_span_criterion_on_a_model_without_spans_says_what_to_use():
    model, task, _ = H.build("fluence_transformer", ["--encoder-layers", "1", "--decoder-layers", "1",
                                                     "--encoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
                                                     "--encoder-attention-heads", "2",
                                                     "--decoder-attention-heads", "2"])
    criterion = AdaptiveSpanLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    with pytest.raises(ValueError, match="--criterion label_smoothed_cross_entropy"):
        criterion(model, H.translation_sample(task))


# ------------------------------------------------------------------------------------------------ clamp
def test_spans_are_clamped_after_a_fairseq_optimizer_step():
    model, _, _ = H.build("transformer_adaptive_span_tiny")
    spans = [m for m in model.modules() if isinstance(m, AdaptiveSpan)]
    opt_args = argparse.Namespace(optimizer="adam", lr=[0.5], adam_betas="(0.9, 0.98)", adam_eps=1e-8,
                                  weight_decay=0.0, use_old_adam=False, fp16_adam_stats=False, tpu=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(opt_args, params)
    with torch.no_grad():
        spans[0].current_val.fill_(1.7)  # set out of range by hand
        spans[1].current_val.fill_(0.9)
    for p in params:
        p.grad = torch.zeros_like(p)
    spans[1].current_val.grad.fill_(-1.0)  # a gradient step that pushes the span up past 1
    spans[2].current_val.grad.fill_(1.0)  # ... and one that pushes it below 0
    optimizer.step()
    assert torch.all(spans[0].current_val == 1.0)
    assert torch.all(spans[1].current_val == 1.0)
    assert torch.all(spans[2].current_val == 0.0)


def test_help_command_documents_every_plugin_flag(capsys):
    from fluence_fairseq.cli import help as plugin_help
    from fluence_fairseq.modules.registry import ATTENTIONS

    plugin_help.main([])
    text = capsys.readouterr().out
    flags = ["--encoder-self-attention", "--decoder-self-attention", "--cross-attention", "--decoder-cross-attention"]
    flags += ["--" + o.name.replace("_", "-") for spec in ATTENTIONS.values() for o in spec.options]
    for flag in flags:
        assert flag in text, f"{flag} missing from fluence-help"
    assert "transformer_adaptive_span_small" in text and "adaptive_span_cross_entropy" in text
    assert "hex_sentence_prediction" in text and "--hex-orth-penalty" in text
    assert "_tiny" not in text  # the test architectures stay registered but are not offered to users


def test_encoder_reorder_skips_reorders_within_the_copies_of_a_row_and_equals_fairseqs():
    """The encoder output records which of its own rows each row copies: a reorder that gives every row a copy of
    the row it already holds returns the output itself; any other reorder equals fairseq's (every entry, the
    intermediate states too), through an expansion to beams, moves within them, sentences swapped and one
    finished."""
    from fairseq.models.transformer import TransformerEncoder

    from fluence_fairseq.models.layers import SOURCE_ROWS
    model, task, _ = H.build("fluence_transformer_tiny")
    model.eval()
    net = H.translation_sample(task, bsz=2, left_pad_lengths=(9, 6))["net_input"]
    with torch.no_grad():
        ours = model.encoder(net["src_tokens"], net["src_lengths"], return_all_hiddens=True)
        theirs = model.encoder(net["src_tokens"], net["src_lengths"], return_all_hiddens=True)
    steps = [(torch.tensor([0, 0, 0, 1, 1, 1]), False), (torch.tensor([2, 0, 0, 4, 5, 3]), True),
             (torch.tensor([3, 4, 5, 0, 1, 2]), False), (torch.tensor([3, 4, 4]), False),
             (torch.tensor([0, 2, 1]), True)]
    for order, kept in steps:
        before = ours
        ours = model.encoder.reorder_encoder_out(ours, order)
        theirs = TransformerEncoder.reorder_encoder_out(model.encoder, theirs, order)
        assert (ours is before) == kept
        for name, tensors in theirs.items():
            assert len(ours[name]) == len(tensors)
            for a, b in zip(ours[name], tensors):
                assert torch.equal(a, b), name
        assert ours[SOURCE_ROWS][0].numel() == order.numel()
