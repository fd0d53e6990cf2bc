"""Global-mask attention pruning in models: flags, masks from pattern files, position alignment, decoding."""
import json
import re

import numpy as np
import pytest
from fairseq.models import build_model
import torch

import fairseq_helpers as H
from fluence_fairseq import FSSoftmax
from fluence_fairseq.pruning.flags import PATTERN_TYPES, attentions_by_type, build_keep_masks
from fluence_fairseq.pruning.masks import GlobalAttentionMask, roll_rows
from fluence_fairseq.pruning.patterns import PatternAccumulator, save_patterns

N = 24  # collected length of the synthetic pattern files


def write_patterns(directory, kind, layers, heads, n=N, seen=None, seed=0):
    """A pattern file whose averages are random (so every rank is distinct) and whose counts say sentences reached
    ``seen`` positions (default: all)."""
    g = torch.Generator().manual_seed(seed)
    acc = PatternAccumulator(layers, heads, n)
    seen = n if seen is None else seen
    weights = torch.rand(1, heads, seen, seen, generator=g)
    if PATTERN_TYPES[kind]:
        weights = weights.tril()
    for layer in range(layers):
        acc.add(layer, weights * (layer + 1), count=layer == 0)
    return save_patterns(str(directory / kind), acc, {"type": kind})["npy"]


def pruned_model(tmp_path, arch="fluence_transformer_tiny", kinds=("self-enc", "self-dec", "enc-dec"), tau=50,
                 extra=(), **kw):
    model, task, args = H.build(arch, ["--encoder-layers", "2", "--decoder-layers", "2"])
    flags = ["--encoder-layers", "2", "--decoder-layers", "2", "--attn-prune-tau", str(tau), *extra]
    for kind in kinds:
        heads = args.encoder_attention_heads if kind == "self-enc" else args.decoder_attention_heads
        path = write_patterns(tmp_path, kind, 2, heads, **kw)
        flags += ["--attn-patterns-" + kind, path]
    return H.build(arch, flags)


def test_rows_positions_and_unknown_entries_kept():
    keep = torch.rand(2, 5, 5) > 0.5
    mask = GlobalAttentionMask(keep, block=4)
    rows = mask.rows(torch.tensor([0, -2]), torch.tensor([0, -2]), 7, 7)
    assert rows.shape == (2, 2, 7, 7)
    assert torch.equal(rows[0, :, :5, :5], keep)
    assert bool(rows[0, :, 5:, :].all()) and bool(rows[0, :, :, 5:].all())  # beyond the collected length
    assert torch.equal(rows[1, :, 2:7, 2:7], keep)  # row 1 is left-padded by 2


def test_roll_rows_is_invertible():
    x = torch.arange(24.).view(2, 3, 4)
    shift = torch.tensor([1, 3])
    rolled = roll_rows(x, shift, 2)
    assert torch.equal(rolled[0, :, 0], x[0, :, 1]) and torch.equal(rolled[1, :, 0], x[1, :, 3])
    assert torch.equal(roll_rows(rolled, -shift, 2), x)


@pytest.mark.parametrize("scope", ["layer", "head", "model"])
def test_model_masks_prune_exact_share_of_allowed_entries(tmp_path, scope):
    model, _, args = pruned_model(tmp_path, tau=50, extra=["--attn-prune-scope", scope])
    for kind, modules in attentions_by_type(model).items():
        causal = PATTERN_TYPES[kind]
        allowed = torch.ones(N, N, dtype=torch.bool)
        if causal:
            allowed = allowed.tril()
        keep = torch.stack([m.global_mask.keep for m in modules])
        assert keep.shape == (2, modules[0].num_heads, N, N)
        assert not bool(keep[..., ~allowed].any())  # the causal triangle is never "kept" (nor counted)
        total = int(allowed.sum()) * keep.size(1) * keep.size(0)
        assert int(keep.sum()) == total - round(total * 0.5) or scope != "model"
        if scope == "layer":
            for layer in range(2):
                n_allowed = int(allowed.sum()) * keep.size(1)
                assert int(keep[layer].sum()) == n_allowed - round(n_allowed * 0.5)
        if scope == "head":
            per_head = keep.flatten(2).sum(-1)
            assert bool((per_head == int(allowed.sum()) - round(int(allowed.sum()) * 0.5)).all())


def test_unobserved_entries_are_kept_and_not_counted(tmp_path):
    path = write_patterns(tmp_path, "self-enc", 1, 2, n=10, seen=6)
    keep, _ = build_keep_masks(path, "self-enc", 1, 2, {"tau": 50.0, "scope": "layer", "random": False, "seed": None})
    assert bool(keep[..., 6:, :].all()) and bool(keep[..., :, 6:].all())
    observed = keep[..., :6, :6]
    assert int(observed.sum()) == 72 - 36


def test_random_pruning_is_reproducible_and_matches_count(tmp_path):
    path = write_patterns(tmp_path, "self-dec", 2, 2)
    settings = {"tau": 90.0, "scope": "layer", "random": True, "seed": 7}
    a, _ = build_keep_masks(path, "self-dec", 2, 2, settings)
    b, _ = build_keep_masks(path, "self-dec", 2, 2, settings)
    c, _ = build_keep_masks(path, "self-dec", 2, 2, {**settings, "seed": 8})
    data, _ = build_keep_masks(path, "self-dec", 2, 2, {**settings, "random": False})
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.sum()) == int(data.sum()) and not torch.equal(a, data)
    assert not bool(a.triu(1).any())


def _per_sentence_reference(module, x, lengths, keep):
    """Each sentence alone, unpadded, attending only where ``keep`` (positions from its first token) allows."""
    outs = []
    for b, n in enumerate(lengths):
        xb = x[-n:, b:b + 1]  # left-padded: the real tokens are the last n
        module.set_global_mask(None)
        allowed = keep[:, :n, :n]
        attn_mask = torch.zeros(1, module.num_heads, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        q = module._heads(module.q_proj(xb), 1)
        k = module._heads(module.k_proj(xb), 1)
        v = module._heads(module.v_proj(xb), 1)
        out, _ = module.attend(q, k, v, key_padding_mask=None, attn_mask=attn_mask, query_offset=0,
                               need_weights=False)
        empty = ~allowed.any(-1, keepdim=True).unsqueeze(0)
        out = out.masked_fill(empty, 0.0)
        outs.append(module.out_proj(out.permute(2, 0, 1, 3).reshape(n, 1, -1)))
    return outs


@pytest.mark.parametrize("arch_attention", ["softmax", "entmax15"])
@pytest.mark.parametrize("block", [4, 32])
def test_left_padded_encoder_uses_positions_of_real_tokens(arch_attention, block):
    from fluence_fairseq.modules.registry import get_attention

    torch.manual_seed(0)
    module = get_attention(arch_attention).build(16, 2, causal=False, cross=False).eval()
    keep = torch.rand(2, 12, 12) > 0.6
    keep[1, 3] = False  # a fully pruned row
    lengths = [12, 9, 5]
    x = torch.randn(12, 3, 16)
    padding = torch.tensor([[i < 12 - n for i in range(12)] for n in lengths])
    module.set_global_mask(GlobalAttentionMask(keep, block=block))
    out, _ = module(x, x, x, key_padding_mask=padding, need_weights=False)
    reference = _per_sentence_reference(module, x, lengths, keep)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[-n:, b:b + 1], reference[b], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cross", [False, True])
def test_incremental_decoding_uses_the_current_mask_row(cross):
    torch.manual_seed(1)
    module = FSSoftmax(16, 2, causal=not cross, cross=cross).eval()
    keep = torch.rand(2, 20, 20) > 0.5
    module.set_global_mask(GlobalAttentionMask(keep, block=4))
    tgt = torch.randn(10, 2, 16)
    src = torch.randn(12, 2, 16) if cross else tgt
    src_pad = torch.zeros(2, 12, dtype=torch.bool)
    src_pad[1, :3] = True  # left-padded source
    kpm = src_pad if cross else None
    full = module(tgt, src, src, key_padding_mask=kpm, need_weights=False)[0]  # the block-sparse path
    full_w = module(tgt, src, src, key_padding_mask=kpm, need_head_weights=True)[1].detach()
    state = {}
    steps, weights = [], []
    for t in range(tgt.size(0)):
        key = src if cross else tgt[t:t + 1]
        out, w = module(tgt[t:t + 1], key, key, key_padding_mask=kpm, incremental_state=state, static_kv=cross,
                        need_head_weights=True)
        steps.append(out)
        weights.append(w)
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-4)
    for t, w in enumerate(weights):
        torch.testing.assert_close(w[..., 0, :], full_w[..., t, :w.size(-1)], atol=1e-5, rtol=1e-4)
    # the pruned entries got zero weight
    if not cross:
        assert float(full_w[:, 0][~keep[:, :10, :10]].abs().max()) == 0.0


def test_beam_reorder_keeps_decoding_positions():
    torch.manual_seed(2)
    module = FSSoftmax(16, 2, causal=True).eval()
    module.set_global_mask(GlobalAttentionMask(torch.rand(2, 20, 20) > 0.4, block=4))
    x = torch.randn(6, 3, 16)
    order = torch.tensor([2, 0, 0])
    state = {}
    for t in range(3):
        module(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)
    module.reorder_incremental_state(state, order)
    x2 = x[:, order]
    outs = [module(x2[t:t + 1], x2[t:t + 1], x2[t:t + 1], incremental_state=state)[0] for t in range(3, 6)]
    full, _ = module(x2, x2, x2)
    torch.testing.assert_close(torch.cat(outs), full[3:], atol=1e-5, rtol=1e-4)


def test_model_incremental_decoder_equals_full_forward(tmp_path):
    model, task, _ = pruned_model(tmp_path, tau=70, extra=["--attn-prune-block", "4"])
    model.eval()
    sample = H.translation_sample(task, bsz=3, src_len=9, tgt_len=7)
    net = sample["net_input"]
    full, _ = model(**net)
    enc = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
    state = {}
    steps = []
    for t in range(net["prev_output_tokens"].size(1)):
        out, _ = model.decoder(net["prev_output_tokens"][:, :t + 1], encoder_out=enc, incremental_state=state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    # and pruning changed the model's output (the masks are applied)
    dense, _, _ = H.build("fluence_transformer_tiny", ["--encoder-layers", "2", "--decoder-layers", "2"])
    dense.load_state_dict(model.state_dict())
    dense.eval()
    assert not torch.allclose(dense(**net)[0], full, atol=1e-3)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file_names_file_and_expected_shape(tmp_path, capsys):
    missing = str(tmp_path / "nope.npy")
    with pytest.raises(SystemExit):  # refused when the arguments are parsed
        H.model_args("fluence_transformer_tiny", ["--attn-patterns-self-enc", missing, "--attn-prune-tau", "50"])
    assert "--attn-patterns-self-enc" in capsys.readouterr().err
    # a checkpoint whose pattern file has moved since: refused when the model is built
    args = H.model_args("fluence_transformer_tiny", ["--encoder-layers", "2", "--attn-prune-tau", "50"])
    args.attn_patterns_self_enc = missing
    with pytest.raises(ValueError, match=r"nope\.npy \(--attn-patterns-self-enc\) does not exist.*compute_attn_score"
                                         r".*--model-overrides \"\{'attn_patterns_self_enc': .*layers=2, heads="):
        build_model(args, H.FluenceDummyTask(args))


@pytest.mark.parametrize("values,message", [
    (np.ones((2, 4, N, N), dtype=np.int64), r"holds int64 values; patterns are average attention probabilities"),
    (-np.ones((2, 4, N, N), dtype=np.float32), r"has negative values"),
])
def test_integer_or_negative_patterns_are_refused(tmp_path, values, message):
    path = tmp_path / "self-enc.npy"
    np.save(path, values)
    with pytest.raises(ValueError, match=message):
        H.build("fluence_transformer_tiny", ["--encoder-layers", "2", "--encoder-attention-heads", "4",
                                             "--attn-patterns-self-enc", str(path), "--attn-prune-tau", "50"])


def test_mismatched_and_corrupt_files(tmp_path):
    path = write_patterns(tmp_path, "self-enc", 3, 2)
    with pytest.raises(ValueError, match=r"self-enc\.npy has 3 layers.*layers=2"):
        H.build("fluence_transformer_tiny", ["--encoder-layers", "2", "--attn-patterns-self-enc", path,
                                             "--attn-prune-tau", "50"])
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"bad\.npy is not a \.npy array"):
        H.build("fluence_transformer_tiny", ["--attn-patterns-self-enc", str(bad), "--attn-prune-tau", "50"])
    dec = write_patterns(tmp_path, "self-dec", 2, 4)
    with pytest.raises(ValueError, match=r"holds self-dec patterns but was given for self-enc"):
        H.build("fluence_transformer_tiny", ["--encoder-layers", "2", "--encoder-attention-heads", "4",
                                             "--attn-patterns-self-enc", dec, "--attn-prune-tau", "50"])
    meta = json.loads((tmp_path / "self-enc.json").read_text())
    meta["counts"] = meta["counts"][:3]
    (tmp_path / "self-enc.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"self-enc\.json has counts of shape"):
        build_keep_masks(path, "self-enc", 3, 2, {"tau": 50.0, "scope": "layer", "random": False, "seed": None})


def test_flag_errors(tmp_path):
    path = write_patterns(tmp_path, "self-enc", 2, 4)
    with pytest.raises(ValueError, match="needs --attn-prune-tau"):
        H.build("fluence_transformer_tiny", ["--attn-patterns-self-enc", path])
    with pytest.raises(ValueError, match="need pattern files"):
        H.build("fluence_transformer_tiny", ["--attn-prune-tau", "50"])
    with pytest.raises(SystemExit):  # refused when parsed ...
        H.model_args("fluence_transformer_tiny", ["--attn-patterns-self-enc", path, "--attn-prune-tau", "100"])
    args = H.model_args("fluence_transformer_tiny", ["--encoder-layers", "2", "--encoder-attention-heads", "4",
                                                     "--attn-patterns-self-enc", path])
    args.attn_prune_tau = 100.0  # ... and when built from a value that bypassed the parser
    with pytest.raises(ValueError, match=r"--attn-prune-tau must be a number in \[0.0, 100.0\)"):
        build_model(args, H.FluenceDummyTask(args))
    with pytest.raises(ValueError, match="has no self-enc attention"):
        H.build("fluence_transformer_lm_tiny", ["--attn-patterns-self-enc", path, "--attn-prune-tau", "50"])


def test_attention_without_matrix_refuses_a_mask(tmp_path):
    path = write_patterns(tmp_path, "self-enc", 2, 4)
    with pytest.raises(ValueError, match="cannot apply a global attention mask"):
        H.build("transformer_performer_tiny", ["--encoder-layers", "2", "--encoder-attention-heads", "4",
                                               "--attn-patterns-self-enc", path, "--attn-prune-tau", "50"])


def test_reference_files_without_counts_are_accepted(tmp_path):
    patterns = np.zeros((2, 1, 2, 8, 8))
    patterns[:, :, :, :5, :6] = np.random.default_rng(0).random((2, 1, 2, 5, 6))
    path = tmp_path / "reference.npy"
    np.save(path, patterns)
    keep, _ = build_keep_masks(str(path), "enc-dec", 2, 2, {"tau": 50.0, "scope": "layer", "random": False,
                                                          "seed": None})
    assert int(keep[:, :, :5, :6].sum()) == 2 * (60 - 30)
    assert bool(keep[:, :, 5:].all()) and bool(keep[:, :, :, 6:].all())


# --------------------------------------------------------------------------------------------------- CLI
def test_pruned_training_and_generation_rebuild_masks_from_files(translation_bin, tmp_path):
    """fairseq-train with pruning flags logs the masks; fairseq-generate rebuilds them from the checkpoint's
    (absolute) paths; once the file is gone, generation fails naming it instead of running unpruned."""
    patterns = tmp_path / "patterns"
    patterns.mkdir()
    flags = []
    for kind in PATTERN_TYPES:
        flags += ["--attn-patterns-" + kind, write_patterns(patterns, kind, 2, 4)]
    save = tmp_path / "ck"
    log = H.run_fairseq("train", [translation_bin, "--user-dir", "fluence_fairseq", "--arch",
                                  "fluence_transformer_tiny", *flags, "--attn-prune-tau", "60",
                                  *H.tiny_train_flags(save, 3)])
    for kind in PATTERN_TYPES:
        assert f"attention pruning: {kind} keeps" in log
    generate = [translation_bin, "--user-dir", H.REPO / "fluence_fairseq", "--path", save / "checkpoint_last.pt",
                "--beam", "2", "--max-len-b", "5", "--batch-size", "8", "--cpu", "--gen-subset", "valid"]
    out = H.run_fairseq("generate", generate, cwd=tmp_path)  # another directory: the paths are absolute
    assert "attention pruning: self-enc keeps" in out and "H-0" in out
    (patterns / "enc-dec.npy").rename(patterns / "moved.npy")
    with pytest.raises(AssertionError, match=r"enc-dec\.npy \(--attn-patterns-enc-dec\) does not exist") as failed:
        H.run_fairseq("generate", generate)
    # the fix the message names works
    override = re.search(r'--model-overrides "(\{[^"]+\})"', str(failed.value)).group(1)
    override = override.replace("NEW/enc-dec.npy", str(patterns / "moved.npy"))
    out = H.run_fairseq("generate", [*generate, "--model-overrides", override])
    assert "attention pruning: enc-dec keeps" in out and "moved.npy" in out and "H-0" in out


@pytest.mark.parametrize("banded", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_block_sparse_kernel_runs_in_the_module_and_matches_the_masked_path(monkeypatch, cross, banded):
    """Where the block-sparse kernel measures faster, the module takes it (left-padded rows rolled into one
    layout); its outputs and gradients equal the exact masked path's. ``banded``: a longer diagonal band, which
    the kernel computes as bands (strided views of the rolled keys) besides buckets."""
    import fluence_fairseq.ops.pruned_attention as pa
    from fluence_fairseq.modules.attention_base import FluenceAttention

    torch.manual_seed(3)
    n, width, holes = (160, 9, 0.05) if banded else (40, 2, 0.3)
    pos = torch.arange(n)
    band = (pos.view(-1, 1) - pos.view(1, -1)).abs() <= width
    keep = band.unsqueeze(0).repeat(2, 1, 1) & (torch.rand(2, n, n) > holes)
    module = FSSoftmax(16, 2, causal=not cross, cross=cross)
    module.set_global_mask(GlobalAttentionMask(keep, block=4))
    tgt_len, src_len = ((140, 150) if cross else (150, 150)) if banded else ((30, 36) if cross else (36, 36))
    band_calls = []
    band_take = pa._Band.take
    monkeypatch.setattr(pa._Band, "take", lambda self, *a: band_calls.append(1) or band_take(self, *a))
    x = torch.randn(tgt_len, 3, 16, requires_grad=True)
    src = torch.randn(src_len, 3, 16) if cross else x
    padding = torch.zeros(3, src_len, dtype=torch.bool)
    padding[1, :5] = True
    padding[2, :11] = True
    kpm = padding  # self attention: the queries are the same left-padded tokens
    calls = []
    original = pa._sparse_path
    monkeypatch.setattr(pa, "_sparse_path", lambda *a, **k: calls.append(1) or original(*a, **k))
    # the module measures both paths at the first call; make the block-sparse one the faster
    monkeypatch.setattr(pa.PrunedPlan, "_time", lambda self, layouts, *a: [10.0 if lay is None else 1.0 for lay in layouts])
    fast, _ = module(x, src, src, key_padding_mask=kpm, need_weights=False)
    assert calls, "the block-sparse kernel did not run"
    if banded:
        assert band_calls, "the kernel took no band"
    generic = FluenceAttention.attend_pruned.__get__(module)
    monkeypatch.setattr(module, "attend_pruned", generic)
    slow, _ = module(x, src, src, key_padding_mask=kpm, need_weights=False)
    real = ~padding.t().unsqueeze(-1) if not cross else torch.ones(tgt_len, 3, 1, dtype=torch.bool)
    torch.testing.assert_close(fast * real, slow * real, atol=1e-5, rtol=1e-4)
    g_fast = torch.autograd.grad((fast * real).square().sum(), x)[0]
    g_slow = torch.autograd.grad((slow * real).square().sum(), x)[0]
    torch.testing.assert_close(g_fast, g_slow, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["softmax", "entmax15"])
def test_default_weights_of_a_pruned_attention_are_the_mean_of_every_heads(name):
    """A head with a fully pruned row has weights 0 there while the other head does not: the default
    (head-averaged) weights are the mean of the per-head weights, even where the math could average itself."""
    from fluence_fairseq.modules.registry import get_attention

    torch.manual_seed(0)
    module = get_attention(name).build(16, 2, causal=False, cross=False).eval()
    module.set_alibi()  # softmax's kernel leaves a relative bias to the generic masked path
    keep = torch.rand(2, 12, 12) > 0.5
    keep[0, 4] = False  # head 0 sees nothing from query 4; head 1 does
    keep[1, 4, :3] = True
    module.set_global_mask(GlobalAttentionMask(keep, block=4))
    x = torch.randn(12, 2, 16)
    _, averaged = module(x, x, x)
    _, per_head = module(x, x, x, need_head_weights=True)
    assert per_head[0, :, 4].abs().sum() == 0 and per_head[1, :, 4].sum() > 0.99
    torch.testing.assert_close(averaged, per_head.mean(dim=0), rtol=0, atol=1e-6)
