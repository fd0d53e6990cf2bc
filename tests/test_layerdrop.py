"""LayerDrop and layer pruning: the ``LayerDrop`` helper, keep-list parsing, state-dict pruning, the models'
load-time pruning (``*_layers_to_keep``), LayerDrop on every fluence architecture, and
``fluence-prune-layers`` (its checkpoint runs in ``fairseq-generate`` without flags)."""
import copy
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import fairseq_helpers as H
from fluence_fairseq.criterions.adaptive_span import (
    AdaptiveSpanLabelSmoothedCrossEntropyCriterion,
    adaptive_spans,
    span_loss,
)
from fluence_fairseq.layerdrop import LayerDrop, count_layers, parse_layers_to_keep, prune_state_dict
from fluence_fairseq.models import ARCHITECTURES
from fluence_fairseq.pruning.layers import count_parameters, prune_checkpoint
from fluence_fairseq.cli.prune_layers import main as prune_main

ENC_DEC_ARCH = "transformer_adaptive_span_tiny"
LM_ARCH = "transformer_lm_adaptive_span_tiny"
THREE_LAYERS = ["--encoder-layers", "3", "--decoder-layers", "3"]
USER_DIR = ["--user-dir", "fluence_fairseq"]


def binomial_ok(kept: int, trials: int, p_keep: float, sigmas: float = 4.5) -> bool:
    sd = math.sqrt(trials * p_keep * (1 - p_keep))
    return abs(kept - trials * p_keep) <= sigmas * sd


class AddIndex(nn.Module):
    """x -> x + 10**i (so the output says exactly which layers ran); counts calls and records kwargs."""

    def __init__(self, i):
        super().__init__()
        self.i, self.calls, self.seen = i, 0, []

    def forward(self, x, mask=None):
        self.calls += 1
        self.seen.append(mask)
        return x + 10.0 ** self.i


def stack(n=4):
    return nn.ModuleList(AddIndex(i) for i in range(n))


# ------------------------------------------------------------------------------------------ LayerDrop helper
def test_eval_runs_every_layer_in_order_and_draws_no_random_numbers():
    drop = LayerDrop(stack(4), p=0.9).eval()
    state = torch.get_rng_state()
    outs = [drop(torch.zeros(2)) for _ in range(5)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(o, torch.full((2,), 1111.0)) for o in outs)
    assert [m.calls for m in drop] == [5, 5, 5, 5]
    assert drop.sample_kept() == [0, 1, 2, 3]


def test_training_drop_rate_matches_p():
    g = torch.Generator().manual_seed(0)
    drop = LayerDrop(stack(10), p=0.3, generator=g).train()
    draws = 400
    kept = [drop.sample_kept() for _ in range(draws)]
    assert all(k == sorted(k) for k in kept)
    assert binomial_ok(sum(map(len, kept)), 10 * draws, 0.7)
    per_layer = [sum(i in k for k in kept) for i in range(10)]
    assert all(binomial_ok(c, draws, 0.7) for c in per_layer), per_layer
    assert len({tuple(k) for k in kept}) > 50  # fresh draws, not one pattern


def test_forward_applies_exactly_the_sampled_layers():
    drop = LayerDrop(stack(4), p=0.5, generator=torch.Generator().manual_seed(3)).train()
    twin = torch.Generator().manual_seed(3)
    for _ in range(20):
        u = torch.rand(4, generator=twin)
        expected = sum(10.0 ** i for i in range(4) if u[i] >= 0.5)
        assert drop(torch.zeros(1)).item() == expected


def test_num_to_drop_draws_without_replacement():
    # Fluence's randint draw with replacement sometimes drops only one of two; we always drop exactly two
    drop = LayerDrop(stack(3), num_to_drop=2, generator=torch.Generator().manual_seed(1)).train()
    kept = [drop.sample_kept() for _ in range(300)]
    assert all(len(k) == 1 for k in kept)
    assert all(binomial_ok(sum(k == [i] for k in kept), 300, 1 / 3) for i in range(3))
    assert drop.eval().sample_kept() == [0, 1, 2]


def test_iteration_indexing_and_len_never_drop():
    drop = LayerDrop(stack(5), p=0.8).train()
    state = torch.get_rng_state()
    assert [m.i for m in drop] == [0, 1, 2, 3, 4] and len(drop) == 5 and drop[2].i == 2
    assert [m.i for m in drop[1:3]] == [1, 2]
    assert len(list(drop.modules())) == 7  # itself, the ModuleList, 5 layers
    assert torch.equal(torch.get_rng_state(), state)


def test_tensor_arguments_reach_every_kept_layer():
    # Fluence's `if not mask:` raised on tensor masks
    drop = LayerDrop(stack(3), p=0.5, generator=torch.Generator().manual_seed(0)).train()
    mask = torch.tensor([True, False, True])
    for _ in range(10):
        drop(torch.zeros(3), mask=mask)
    assert sum(m.calls for m in drop) > 0
    assert all(s is mask for m in drop for s in m.seen)


def test_prune_keeps_sorted_layers_and_shares_modules():
    layers = stack(4)
    drop = LayerDrop(layers, p=0.2)
    small = drop.prune("2,0")
    assert isinstance(small, LayerDrop) and [m.i for m in small] == [0, 2] and small[1] is layers[2]
    assert small.p == 0.2 and small.eval()(torch.zeros(1)).item() == 101.0
    assert LayerDrop(stack(4), num_to_drop=3).prune([1, 3]).num_to_drop == 1
    with pytest.raises(ValueError, match="out of range"):
        drop.prune([0, 4])
    with pytest.raises(ValueError, match="more than once"):
        drop.prune([1, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=1.0), r"\[0, 1\)"), (dict(p=-0.1), r"\[0, 1\)"), (dict(p=float("nan")), r"\[0, 1\)"),
    (dict(p=True), r"\[0, 1\)"), (dict(num_to_drop=4), r"num_to_drop must be in \[0, 4\)"),
    (dict(num_to_drop=-1), "num_to_drop must be in"), (dict(num_to_drop=1.0), "must be an int"),
    (dict(p=0.2, num_to_drop=1), "not both"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerDrop(stack(4), **kwargs)


def test_bad_layers_raise():
    with pytest.raises(ValueError, match="at least one layer"):
        LayerDrop(nn.ModuleList(), p=0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        LayerDrop([nn.Linear(2, 2), "relu"], p=0.1)
    with pytest.raises(TypeError, match="torch.Generator"):
        LayerDrop(stack(2), p=0.1, generator=0)


# ------------------------------------------------------------------------------------------ keep lists
@pytest.mark.parametrize("value", ["2,0", " 0, 2 ", [2, 0], (0, 2), "[0,2]"])
def test_keep_lists_parse_to_sorted_ints(value):
    assert parse_layers_to_keep(value, 3) == [0, 2]


def test_keep_list_edge_values():
    assert parse_layers_to_keep(None) is None and parse_layers_to_keep("") is None
    assert parse_layers_to_keep(1, 2) == [1]


@pytest.mark.parametrize("value, match", [
    ("0,0", r"layer\(s\) \[0\] listed more than once"), ("0,3", r"\[3\] out of range: the model has 3 layers"),
    ("0,-1", "non-negative"), ("0,a", "comma-separated"), ([0, 1.5], "must be ints"), ([], "empty"),
    ({"a": 1}, "expected a string"),
])
def test_bad_keep_lists_raise_clear_errors(value, match):
    with pytest.raises(ValueError, match=match):
        parse_layers_to_keep(value, 3, name="decoder_layers_to_keep")


def fake_state_dict(enc=3, dec=3):
    sd = {"encoder.embed_tokens.weight": torch.zeros(1), "encoder.layer_norm.weight": torch.zeros(1)}
    for side, n in (("encoder", enc), ("decoder", dec)):
        for i in range(n):
            sd[f"{side}.layers.{i}.fc1.weight"] = torch.full((1,), 10.0 * (side == "decoder") + i)
    sd["decoder.output_projection.weight"] = torch.zeros(1)
    return sd


def test_prune_state_dict_prunes_each_side_independently():
    sd = fake_state_dict()
    dec_only = prune_state_dict(sd, {"decoder": "2,0"})  # fairseq#1257: fairseq dropped every encoder layer here
    assert [k for k in dec_only if k.startswith("encoder.")] == [k for k in sd if k.startswith("encoder.")]
    assert count_layers(dec_only, "decoder") == 2 and dec_only["decoder.layers.1.fc1.weight"].item() == 12.0
    enc_only = prune_state_dict(sd, {"encoder": [1], "decoder": None})
    assert count_layers(enc_only, "encoder") == 1 and enc_only["encoder.layers.0.fc1.weight"].item() == 1.0
    assert count_layers(enc_only, "decoder") == 3 and "encoder.layer_norm.weight" in enc_only
    both = prune_state_dict(sd, {"encoder": "0,2", "decoder": "1"})
    assert (count_layers(both, "encoder"), count_layers(both, "decoder")) == (2, 1)
    assert len(both) == len(sd) - 3
    with pytest.raises(ValueError, match="out of range"):
        prune_state_dict(sd, {"encoder": "3"})


# ------------------------------------------------------------------------------------------ models
def restricted(model, keep):
    """A copy of ``model`` whose layer stacks hold only the kept layers (the reference for pruning)."""
    ref = copy.deepcopy(model)
    for side, kept in keep.items():
        if kept is not None:
            stack_ = getattr(ref, side)
            stack_.layers = nn.ModuleList(stack_.layers[i] for i in kept)
            stack_.num_layers = len(kept)
    return ref


def translation_logits(model, task):
    model.eval()
    with torch.no_grad():
        return model(**H.translation_sample(task)["net_input"])[0]


@pytest.mark.parametrize("arch", [ENC_DEC_ARCH, "transformer_local_tiny"])
@pytest.mark.parametrize("keep", [{"encoder": "0,2"}, {"decoder": "1"}, {"encoder": "2", "decoder": "2,0"}],
                         ids=["encoder", "decoder", "both"])
def test_load_time_pruning_matches_the_restricted_full_model(arch, keep):
    full, task, _ = H.build(arch, [*THREE_LAYERS, "--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5"])
    flags = [f for side, v in keep.items() for f in (f"--{side}-layers-to-keep", v)]
    # the CLI parses the encoder-decoder's keep flags to lists of ints (fairseq's .split(",") broke on them)
    small, _, args = H.build(arch, [*THREE_LAYERS, *flags], task=task, seed=5)
    small.load_state_dict(full.state_dict(), model_cfg=args)
    parsed = {side: parse_layers_to_keep(v) for side, v in keep.items()}
    for side in ("encoder", "decoder"):
        expected = len(parsed[side]) if side in parsed else 3
        assert len(getattr(small, side).layers) == expected == getattr(args, f"{side}_layers")
        assert getattr(args, f"{side}_layers_to_keep") is None  # reset: the model now saves as a small one
    assert torch.allclose(translation_logits(small, task), translation_logits(restricted(full, parsed), task),
                          atol=1e-6)
    assert not torch.allclose(translation_logits(small, task), translation_logits(full, task), atol=1e-3)


def test_model_override_strings_prune_at_load_and_already_pruned_checkpoints_load_as_they_are():
    full, task, args = H.build(ENC_DEC_ARCH, THREE_LAYERS)
    over = copy.deepcopy(args)
    over.decoder_layers_to_keep = "0,2"  # what --model-overrides sets on the stored namespace
    small = H.fairseq_build_model(over, task)
    small.load_state_dict(full.state_dict(), model_cfg=over)
    # a model trained from scratch with a keep list stores it; its checkpoint already has the kept layers
    again, _, a2 = H.build(ENC_DEC_ARCH, ["--encoder-layers", "3", "--decoder-layers", "2",
                                          "--decoder-layers-to-keep", "0,2"], task=task)
    again.load_state_dict(small.state_dict(), model_cfg=a2)
    assert a2.decoder_layers_to_keep is None
    assert torch.equal(translation_logits(again, task), translation_logits(small, task))


@pytest.mark.parametrize("flags, match", [
    (["--decoder-layers-to-keep", "0,0"], "listed more than once"),
    (["--encoder-layers-to-keep", "0,5"], r"out of range: the model has 3 layers"),
    (["--decoder-layers-to-keep", "0,1,2,3"], "keeps 4 layers"),
])
def test_bad_keep_lists_fail_at_build(flags, match):
    with pytest.raises(ValueError, match=match):
        H.build(ENC_DEC_ARCH, [*THREE_LAYERS, *flags])


def test_checkpoint_with_too_few_layers_fails_clearly():
    two, task, _ = H.build(ENC_DEC_ARCH, [])  # 2+2 layers
    big, _, args = H.build(ENC_DEC_ARCH, ["--encoder-layers", "5", "--encoder-layers-to-keep", "0,2,4"], task=task)
    with pytest.raises(ValueError, match="keeps 3 layers but the checkpoint has only 2"):
        big.load_state_dict(two.state_dict(), model_cfg=args)


def lm_logits(model, task):
    model.eval()
    with torch.no_grad():
        return model(**H.lm_sample(task)["net_input"])[0]


def test_language_model_pruning_at_load_and_with_the_command(tmp_path):
    full, task, args = H.build(LM_ARCH, ["--decoder-layers", "4", "--decoder-layerdrop", "0.5"])
    reference = lm_logits(restricted(full, {"decoder": [1, 3]}), task)
    small, _, sargs = H.build(LM_ARCH, ["--decoder-layers", "4", "--decoder-layers-to-keep", "3,1"], task=task)
    small.load_state_dict(full.state_dict(), model_cfg=sargs)
    assert torch.allclose(lm_logits(small, task), reference, atol=1e-6)
    # the command on a checkpoint-shaped dict, through a weights-only save/load round trip
    state = {"args": copy.deepcopy(args), "model": full.state_dict(), "last_optimizer_state": {"state": {}},
             "cfg": None}
    lines = []
    prune_checkpoint(state, {"decoder": "1,3"}, log=lines.append)
    torch.save(state, tmp_path / "lm.pt")
    state = torch.load(tmp_path / "lm.pt", weights_only=True)
    assert state["args"].decoder_layers == 2 and state["args"].decoder_layers_to_keep is None
    assert state["last_optimizer_state"] is None and any("optimizer" in ln for ln in lines)
    loaded = H.fairseq_build_model(state["args"], task)
    loaded.load_state_dict(state["model"], model_cfg=state["args"])
    assert torch.allclose(lm_logits(loaded, task), reference, atol=1e-6)
    n_full = sum(p.numel() for p in full.parameters())
    n_small = sum(p.numel() for p in loaded.parameters())
    per_layer = sum(p.numel() for p in full.decoder.layers[0].parameters())
    assert n_full - n_small == 2 * per_layer
    assert f"{count_parameters(state['model']):,}" in lines[-1]


# ------------------------------------------------------------------------------------------ LayerDrop in models
TINY = [a.name for a in ARCHITECTURES if a.name.endswith("_tiny")]
ARCHITECTURE_MODELS = {a.name: a.model for a in ARCHITECTURES}


@pytest.mark.parametrize("arch", TINY)
def test_layerdrop_on_every_tiny_architecture(arch):
    """Training forwards run with layers dropped; eval runs every layer, deterministically, and equals the same
    model built without LayerDrop."""
    lm = ARCHITECTURE_MODELS[arch] == "fluence_transformer_lm"
    sides = ("decoder",) if lm else ("encoder", "decoder")
    drop_flags = [f for side in sides for f in (f"--{side}-layerdrop", "0.5")]
    model, task, _ = H.build(arch, drop_flags)
    plain, _, _ = H.build(arch, [], task=task)
    sample = H.lm_sample(task) if lm else H.translation_sample(task)
    layers = [layer for side in sides for layer in nn.ModuleList.__iter__(getattr(model, side).layers)]
    calls = [0]
    for layer in layers:
        layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model.train()
    torch.manual_seed(0)
    for _ in range(6):
        out = model(**sample["net_input"])[0]
        out.float().sum().backward()
    assert 0 < calls[0] < 6 * len(layers)  # P(no drop or all dropped in all 6 passes) is negligible
    model.eval()
    calls[0] = 0
    with torch.no_grad():
        a, b = model(**sample["net_input"])[0], model(**sample["net_input"])[0]
        plain.load_state_dict(model.state_dict())
        c = plain.eval()(**sample["net_input"])[0]
    assert calls[0] == 2 * len(layers)
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)


def test_training_forward_equals_the_model_without_the_dropped_layers():
    """A training forward with drops is exactly the model with the dropped layers removed (same draw), so LayerDrop
    skips whole residual blocks and nothing else."""
    model, task, _ = H.build("transformer_alpha_entmax_tiny", ["--decoder-layers", "4", "--decoder-layerdrop", "0.5",
                                                               "--dropout", "0", "--alpha-init", "1.5"])
    sample = H.translation_sample(task)
    model.train()
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        kept = (torch.empty(4).uniform_() > 0.5).nonzero().flatten().tolist()  # fairseq's draw, per forward
        torch.manual_seed(seed)
        out = model(**sample["net_input"])[0]
        reference = copy.deepcopy(model)
        reference.decoder.layers = nn.ModuleList([reference.decoder.layers[i] for i in kept])
        torch.testing.assert_close(out, reference(**sample["net_input"])[0], atol=1e-6, rtol=0)
        seen.add(tuple(kept))
    assert len(seen) > 1  # different draws were exercised


def test_model_drop_rate_matches_p():
    model, task, _ = H.build(ENC_DEC_ARCH, ["--encoder-layers", "6", "--decoder-layers", "6",
                                            "--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5"])
    runs = []
    for side in ("encoder", "decoder"):
        for layer in nn.ModuleList.__iter__(getattr(model, side).layers):
            layer.register_forward_hook(lambda *_: runs.append(1))
    sample = H.translation_sample(task, bsz=1, src_len=4, tgt_len=3, left_pad_lengths=(4,))
    model.train()
    torch.manual_seed(1)
    forwards = 60
    with torch.no_grad():
        for _ in range(forwards):
            model(**sample["net_input"])
    assert binomial_ok(len(runs), 12 * forwards, 0.5)


def test_span_loss_is_unchanged_by_drops_and_bookkeeping_draws_no_random_numbers():
    flags = [*THREE_LAYERS, "--adapt-span-init", "0.3"]
    model, task, _ = H.build(ENC_DEC_ARCH, [*flags, "--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5"])
    plain, _, _ = H.build(ENC_DEC_ARCH, flags, task=task)
    assert len(adaptive_spans(model)) == 6  # encoder and decoder self attentions of 3+3 layers
    expected = span_loss(plain)
    model.train()
    state = torch.get_rng_state()
    assert torch.equal(span_loss(model), expected)
    assert torch.equal(torch.get_rng_state(), state)  # no LayerDropModuleList was iterated
    criterion = AdaptiveSpanLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    sample = H.translation_sample(task)
    torch.manual_seed(0)
    for _ in range(4):
        model.zero_grad()
        loss, sample_size, log = criterion(model, sample)
        assert log["span_loss__sum"] == float(expected.detach().float())
        loss.backward()
        # every span, of dropped layers too, gets the span loss's gradient
        assert all(s.current_val.grad is not None and s.current_val.grad.abs().sum() > 0
                   for s in adaptive_spans(model))


# ------------------------------------------------------------------------------------------ command + CLI
@pytest.fixture(scope="module")
def layerdrop_checkpoint(translation_bin, tmp_path_factory):
    """A 3+3-layer adaptive-span model trained 4 updates with LayerDrop 0.5 on both sides."""
    save = tmp_path_factory.mktemp("layerdrop_ckpt")
    H.run_fairseq("train", [translation_bin, *USER_DIR, "--arch", ENC_DEC_ARCH, *THREE_LAYERS,
                            "--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5",
                            "--criterion", "adaptive_span_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                            *H.tiny_train_flags(save, 4)])
    return translation_bin, save / "checkpoint_last.pt"


def load(path, data, **overrides):
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)],
                                                                      arg_overrides={"data": str(data), **overrides})
    return models[0], task


def run_prune(*args):
    proc = subprocess.run([sys.executable, "-m", "fluence_fairseq.cli.prune_layers", *map(str, args)], cwd=H.REPO,
                          env=H.clean_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    return proc.returncode, proc.stdout


def test_prune_command_and_overrides_match_the_restricted_model(layerdrop_checkpoint, tmp_path):
    data, ckpt = layerdrop_checkpoint
    full, task = load(ckpt, data)
    keep = {"encoder": [0, 2], "decoder": [1]}
    reference = translation_logits(restricted(full, keep), task)
    rc, out = run_prune(ckpt, tmp_path / "small.pt", "--encoder-layers-to-keep", "2,0",
                        "--decoder-layers-to-keep", "1")
    assert rc == 0, out
    assert "dropped the optimizer state" in out and "parameters: " in out and " -> " in out
    state = torch.load(tmp_path / "small.pt", weights_only=True)
    margs = state["cfg"]["model"]
    assert (margs.encoder_layers, margs.decoder_layers) == (2, 1)
    assert margs.encoder_layers_to_keep is None and margs.decoder_layers_to_keep is None
    pruned, _ = load(tmp_path / "small.pt", data)
    assert torch.allclose(translation_logits(pruned, task), reference, atol=1e-6)
    # the same at load time, the decoder alone (fairseq#1257) and the encoder as a list
    dec, _ = load(ckpt, data, decoder_layers_to_keep="1")
    assert len(dec.encoder.layers) == 3 and len(dec.decoder.layers) == 1
    assert torch.allclose(translation_logits(dec, task),
                          translation_logits(restricted(full, {"decoder": [1]}), task), atol=1e-6)
    both, _ = load(ckpt, data, encoder_layers_to_keep=[2, 0], decoder_layers_to_keep="1")
    assert torch.allclose(translation_logits(both, task), reference, atol=1e-6)


def test_pruned_checkpoint_runs_in_fairseq_generate_without_flags(layerdrop_checkpoint, tmp_path):
    data, ckpt = layerdrop_checkpoint
    rc, out = run_prune(ckpt, tmp_path / "dec.pt", "--decoder-layers-to-keep", "0,2")
    assert rc == 0, out
    gen = H.run_fairseq("generate", [data, "--path", tmp_path / "dec.pt", *USER_DIR, "--cpu", "--beam", "2",
                                     "--max-len-b", "20", "--batch-size", "16"])
    assert gen.count("\nH-") == 16 and "BLEU" in gen


@pytest.mark.parametrize("flags, match", [
    ([], "nothing to prune"), (["--decoder-layers-to-keep", "0,3"], r"out of range: the model has 3 layers"),
    (["--encoder-layers-to-keep", "1,1"], "listed more than once"),
])
def test_prune_command_rejects_bad_keep_lists(layerdrop_checkpoint, tmp_path, capsys, flags, match):
    _, ckpt = layerdrop_checkpoint
    with pytest.raises(SystemExit) as exit_:
        prune_main([str(ckpt), str(tmp_path / "x.pt"), *flags])
    assert exit_.value.code == 2 and re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_finetuning_with_layers_to_keep_at_train_time_saves_a_small_model(layerdrop_checkpoint, tmp_path):
    data, ckpt = layerdrop_checkpoint
    log = H.run_fairseq("train", [data, *USER_DIR, "--arch", ENC_DEC_ARCH, *THREE_LAYERS,
                                  "--encoder-layers-to-keep", "0,2", "--restore-file", ckpt, "--reset-optimizer",
                                  "--reset-dataloader", "--reset-meters", "--criterion",
                                  "adaptive_span_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                                  *H.tiny_train_flags(tmp_path, 2)])
    assert "pruning the encoder from 3 to 2 layers" in log
    model, _ = load(tmp_path / "checkpoint_last.pt", data)
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 3
