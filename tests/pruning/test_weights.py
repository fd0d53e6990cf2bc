"""Weight pruning (``fluence_fairseq.pruning.weights``): exact sparsity (global, per layer, counts, structured ln),
l1 picks the smallest magnitudes, seeded random pruning, attention-head removal that leaves the kept heads'
outputs unchanged, tied embeddings, clear errors, and the command: its checkpoint has plain zeroed weights, records
its settings, loads with fairseq's checkpoint_utils and runs in ``fairseq-generate``."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import fairseq_helpers as H
from fluence_fairseq.cli.prune_weights import main as prune_main
from fluence_fairseq.pruning.weights import (
    DEFAULT_EXCLUDE,
    PruningError,
    attention_modules,
    choose_heads,
    head_importance,
    parse_amount,
    prune_checkpoint,
    prune_model,
    select,
)

ARCH = "fluence_transformer_tiny"  # 2+2 layers, width 64, 4 heads, softmax attention
USER_DIR = ["--user-dir", "fluence_fairseq"]


def tiny(arch=ARCH, extra=("--share-all-embeddings",), seed=0):
    model, task, _ = H.build(arch, list(extra), seed=seed)
    return model.eval(), task


def layer_linears(model):
    """The default selection: every Linear weight except the (tied) output projection."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and "output_projection" not in n}


def zeros(t):
    return int((t == 0).sum())


# --------------------------------------------------------------------------------------- unstructured
def test_global_l1_zeroes_exactly_the_smallest_magnitudes():
    model, _ = tiny()
    before = {k: v.detach().clone() for k, v in layer_linears(model).items()}
    embed = model.encoder.embed_tokens.weight.detach().clone()
    biases = {n: m.bias.detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.bias is not None}
    assert any(zeros(b) < b.numel() for b in biases.values())  # fairseq zero-initialises some biases, not all
    report = prune_model(model, 0.3)
    after = layer_linears(model)
    total = sum(v.numel() for v in before.values())
    assert sum(zeros(v) for v in after.values()) == round(0.3 * total)
    assert report["overall"]["zeros"] == round(0.3 * total) and report["overall"]["numel"] == total
    assert set(report["modules"]) == set(before)
    # one global threshold: every pruned magnitude <= every kept one; kept weights are untouched
    pruned = torch.cat([before[k][after[k] == 0].abs() for k in before])
    kept = torch.cat([before[k][after[k] != 0].abs() for k in before])
    assert pruned.max() <= kept.min()
    assert all(torch.equal(after[k][after[k] != 0], before[k][after[k] != 0]) for k in before)
    # per-module sparsity varies under a global threshold, and is reported from the weights
    per = [report["modules"][k]["sparsity"] for k in before]
    assert max(per) - min(per) > 0.01
    assert all(report["modules"][k]["zeros"] == zeros(after[k]) for k in before)
    # biases, embeddings and the output projection are not pruned by default
    assert torch.equal(model.encoder.embed_tokens.weight, embed)
    assert all(torch.equal(m.bias, biases[n]) for n, m in model.named_modules() if n in biases)


@pytest.mark.parametrize("amount", [0.5, 0.9, 37])
def test_layer_scope_prunes_every_tensor_by_the_amount(amount):
    model, _ = tiny()
    report = prune_model(model, amount, scope="layer", include=["encoder.layers.*"])
    chosen = {k: v for k, v in layer_linears(model).items() if k.startswith("encoder.layers.")}
    assert set(report["modules"]) == set(chosen) and len(chosen) == 12  # 2 layers x (q, k, v, out, fc1, fc2)
    for name, w in chosen.items():
        want = amount if isinstance(amount, int) else round(amount * w.numel())
        assert zeros(w) == want, name
    assert all(zeros(w) == 0 for k, w in layer_linears(model).items() if k.startswith("decoder."))


def test_global_count_and_exclude_patterns():
    model, _ = tiny()
    report = prune_model(model, 1000, include=["re:decoder\\.layers\\.\\d+\\.fc[12]"], exclude=["*layers.1.*"])
    assert set(report["modules"]) == {"decoder.layers.0.fc1.weight", "decoder.layers.0.fc2.weight"}
    assert report["overall"]["zeros"] == 1000
    assert zeros(model.decoder.layers[1].fc1.weight) == 0


def test_random_pruning_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone():
    masks = []
    for seed in (7, 7, 8):
        model, _ = tiny()
        state = torch.get_rng_state()
        prune_model(model, 0.4, method="random", seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        masks.append(torch.cat([(w == 0).flatten() for w in layer_linears(model).values()]))
    assert int(masks[0].sum()) == round(0.4 * masks[0].numel())
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    # random is not magnitude pruning: some pruned weights are larger than some kept ones
    model, _ = tiny()
    before = {k: v.detach().clone() for k, v in layer_linears(model).items()}
    prune_model(model, 0.4, method="random", seed=7)
    after = layer_linears(model)
    assert torch.cat([before[k][after[k] == 0].abs() for k in before]).max() > \
        torch.cat([before[k][after[k] != 0].abs() for k in before]).min()


@pytest.mark.parametrize("dim", [0, 1])
def test_ln_structured_zeroes_whole_rows_or_columns_with_the_smallest_norms(dim):
    model, _ = tiny()
    w0 = model.encoder.layers[0].fc1.weight.detach().clone()  # (128, 64)
    prune_model(model, 0.25, method="ln", scope="layer", include=["encoder.layers.0.fc1"], n=2, dim=dim)
    w = model.encoder.layers[0].fc1.weight
    other = 1 - dim
    dead = (w == 0).all(dim=other)
    assert int(dead.sum()) == round(0.25 * w.shape[dim])
    assert zeros(w) == int(dead.sum()) * w.shape[other]  # nothing else was zeroed
    norms = w0.norm(dim=other)
    assert norms[dead].max() <= norms[~dead].min()


def test_tied_output_projection_prunes_the_embeddings_and_says_so():
    model, _ = tiny()
    report = prune_model(model, 0.2, include=["*output_projection"], exclude=[])
    assert set(report["modules"]) == {"decoder.output_projection.weight"}
    assert set(report["shared"]["decoder.output_projection.weight"]) == {"encoder.embed_tokens.weight",
                                                                           "decoder.embed_tokens.weight"}
    emb = model.encoder.embed_tokens.weight
    assert emb is model.decoder.output_projection.weight  # still tied after prune.remove
    assert zeros(emb) == round(0.2 * emb.numel())


def test_no_reparametrisation_is_left_behind():
    model, _ = tiny()
    prune_model(model, 0.5, prune_heads=0.5)
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith("_orig") or k.endswith("_mask")]
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------- heads
def out_proj_inputs(model, sample):
    """Each attention module's input to out_proj (its heads' outputs side by side) and its output."""
    seen = {}
    hooks = []

    def record(name):
        def hook(module, args, out):
            seen[name] = (args[0].detach().clone(), out.detach().clone())
        return hook

    for name, m in attention_modules(model).items():
        # fairseq's MultiheadAttention otherwise takes torch's fused path, which never calls out_proj as a module;
        # its other path computes the same attention and does
        m.skip_embed_dim_check = True
        hooks.append(m.out_proj.register_forward_hook(record(name)))
    with torch.no_grad():
        model(**sample["net_input"])
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch, extra", [
    (ARCH, ("--share-all-embeddings",)),
    # fairseq's own MultiheadAttention (its fast path packs q/k/v into one projection)
    ("transformer", ("--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32",
                     "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
                     "--encoder-attention-heads", "4", "--decoder-attention-heads", "4")),
])
def test_removed_heads_contribute_nothing_and_kept_heads_are_unchanged(arch, extra):
    model, task = tiny(arch, extra)
    sample = H.translation_sample(task)
    originals = {n: (m.out_proj.weight.detach().clone(), m.out_proj.bias.detach().clone())
                 for n, m in attention_modules(model).items()}
    spec = ["encoder.layers.0.self_attn:1,3", "decoder.layers.1.encoder_attn:0", "decoder.layers.0.self_attn:2"]
    # only the layer whose inputs are the raw embeddings can be compared end to end: later layers see inputs that
    # changed because an earlier head was removed. So remove heads in one module at a time and check that module.
    for one in spec:
        name, heads = one.split(":")
        heads = [int(h) for h in heads.split(",")]
        model, task = tiny(arch, extra)
        before = out_proj_inputs(model, sample)
        report = prune_model(model, heads=[one])
        assert report["heads"] == {name: heads}
        after = out_proj_inputs(model, sample)
        assert set(after) == set(before) == set(originals)
        m = attention_modules(model)[name]
        d = m.head_dim
        x0, _ = before[name]
        x1, y1 = after[name]
        for h in range(m.num_heads):
            cols = slice(h * d, (h + 1) * d)
            if h in heads:
                assert torch.count_nonzero(x1[..., cols]) == 0
            else:
                assert torch.allclose(x1[..., cols], x0[..., cols], atol=1e-5), (name, h)
        # the module's output is the original out_proj applied to the kept heads only
        w, b = originals[name]
        kept = x0.clone()
        for h in heads:
            kept[..., h * d:(h + 1) * d] = 0
        assert torch.allclose(y1, kept @ w.t() + b, atol=1e-5)
        # modules before it in the computation are untouched
        assert all(torch.equal(after[n][0], before[n][0]) for n in before if n.startswith("encoder.layers.0")
                   and n != name)


def test_prune_heads_removes_the_least_important_and_keeps_one():
    model, _ = tiny()
    attn = attention_modules(model)
    scores = {n: head_importance(m) for n, m in attn.items()}
    chosen = choose_heads(model, fraction=0.5)
    assert set(chosen) == set(attn)
    for name, heads in chosen.items():
        assert len(heads) == 2
        assert set(heads) == set(torch.argsort(scores[name])[:2].tolist())
    assert all(len(h) == 3 for h in choose_heads(model, fraction=0.99).values())  # never all 4
    only = choose_heads(model, fraction=0.25, modules=["decoder.layers.*.encoder_attn"])
    assert set(only) == {"decoder.layers.0.encoder_attn", "decoder.layers.1.encoder_attn"}
    prune_model(model, prune_heads=0.5)
    for name, heads in chosen.items():
        m = attn[name]
        for h in range(m.num_heads):
            cols = m.out_proj.weight[:, h * m.head_dim:(h + 1) * m.head_dim]
            assert (torch.count_nonzero(cols) == 0) == (h in heads)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    ({"amount": 1.0}, r"out of range: a fraction must be in \[0, 1\)"),
    ({"amount": -0.1}, r"out of range"),
    ({"amount": -3}, r"negative"),
    ({"amount": 10 ** 9}, r"more than the .* selected weights"),
    ({"amount": 0.5, "include": ["encoder.layers.*.fc9"]}, r"'encoder.layers.\*.fc9' matches no Linear module"),
    ({"amount": 0.5, "include": ["decoder.*"], "exclude": ["decoder.*"]}, r"leave no Linear module"),
    ({"amount": 0.5, "method": "l2"}, r"unknown method 'l2': use one of l1, random, ln"),
    ({"amount": 0.5, "scope": "model"}, r"unknown scope"),
    ({"amount": 0.5, "method": "ln"}, r"use scope 'layer'"),
    ({"amount": 0.5, "types": ["dense"]}, r"unknown module type 'dense'"),
    ({"heads": ["encoder.layers.0.self_attn:4"]}, r"head 4 is out of range: encoder.layers.0.self_attn has 4 heads"),
    ({"heads": ["encoder.layers.0.self_attn:1,1"]}, r"more than once"),
    ({"heads": ["encoder.layers.0.attn:1"]}, r"matches no attention module"),
    ({"heads": ["encoder.layers.0.self_attn"]}, r"write MODULE:I,J"),
    ({"prune_heads": 1.0}, r"in \[0, 1\)"),
    ({}, r"nothing to prune"),
])
def test_bad_settings_raise_clear_errors_and_leave_the_model_alone(kwargs, match):
    model, _ = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=match):
        prune_model(model, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_amount_parsing():
    assert parse_amount("0.5") == 0.5 and parse_amount(".5") == 0.5 and parse_amount("0") == 0.0
    assert parse_amount("1000") == 1000 and isinstance(parse_amount("1000"), int)
    for bad in ("1.0", "1", "1.5", "-0.2", "half"):
        if bad == "1":
            assert parse_amount(bad) == 1  # a count of one weight
            continue
        with pytest.raises(PruningError):
            parse_amount(bad)


def test_select_dedupes_tied_tensors():
    model, _ = tiny()
    targets = select(model, types=["embedding", "linear"], exclude=[])
    ids = [id(getattr(t.module, t.param)) for t in targets]
    assert len(ids) == len(set(ids))
    assert sum(t.name.endswith("embed_tokens.weight") or "output_projection" in t.name for t in targets) == 1
    assert DEFAULT_EXCLUDE == ("*output_projection*",)


@pytest.mark.parametrize("arch", ["fluence_transformer_lm_tiny", "transformer_adaptive_span_tiny"])
def test_prune_checkpoint_rebuilds_other_architectures_from_their_config(arch):
    # an argparse-era checkpoint (only ``args``), a language model and an adaptive-span model, no data needed
    model, _, args = H.build(arch, [])
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": dict(dense), "args": args, "extra_state": None}
    report = prune_checkpoint(state, amount=0.4, scope="layer", log=lambda *_: None)
    assert set(state["model"]) == set(dense) and len(report["modules"]) >= 8
    for name in report["modules"]:
        assert zeros(state["model"][name]) == round(0.4 * dense[name].numel()), name
    untouched = [k for k in dense if k not in report["modules"]]
    assert untouched and all(torch.equal(state["model"][k], dense[k]) for k in untouched)
    assert state["extra_state"]["weight_pruning"][0]["settings"]["amount"] == 0.4


# -------------------------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def dense_checkpoint(translation_bin, tmp_path_factory):
    """fluence_transformer_tiny with shared embeddings, trained 2 updates on the character data."""
    save = tmp_path_factory.mktemp("wp_ckpt")
    H.run_fairseq("train", [translation_bin, *USER_DIR, "--arch", ARCH, "--share-all-embeddings",
                            "--criterion", "cross_entropy", *H.tiny_train_flags(save, 2)])
    return translation_bin, save / "checkpoint_last.pt"


def run_command(*args):
    proc = subprocess.run([sys.executable, "-m", "fluence_fairseq.cli.prune_weights", *map(str, args)], cwd=H.REPO,
                          env=H.clean_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    return proc.returncode, proc.stdout


def load(path, data):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    return models[0].eval(), task


def test_command_writes_plain_zeroed_weights_that_fairseq_loads(dense_checkpoint, tmp_path):
    data, ckpt = dense_checkpoint
    dense = torch.load(ckpt, weights_only=True)["model"]
    out = tmp_path / "layer.pt"
    rc, log = run_command(ckpt, out, "--amount", "0.7", "--scope", "layer", "--heads",
                          "decoder.layers.1.encoder_attn:2")
    assert rc == 0, log
    state = torch.load(out, weights_only=True)
    weights = state["model"]
    assert not [k for k in weights if k.endswith("_orig") or k.endswith("_mask")]
    assert set(weights) == set(dense)
    linears = [k for k in weights if k.endswith(("_proj.weight", "fc1.weight", "fc2.weight"))
               and "output_projection" not in k]
    assert len(linears) == 2 * 6 + 2 * 10
    cross = "decoder.layers.1.encoder_attn."
    for k in linears:
        if not k.startswith(cross):  # exactly 70% per tensor
            assert zeros(weights[k]) == round(0.7 * weights[k].numel()), k
    # the removed head's 16 rows/columns (width 64 / 4 heads) add to the 70% in that module
    assert zeros(weights[cross + "out_proj.weight"][:, 32:48]) == 64 * 16
    assert zeros(weights[cross + "q_proj.bias"][32:48]) == 16 and zeros(weights[cross + "q_proj.bias"]) == 16
    # everything not selected is bit-identical, tied embeddings still one tensor
    for k in weights:
        if k not in linears and not k.startswith(cross):
            assert torch.equal(weights[k], dense[k]), k
    assert weights["encoder.embed_tokens.weight"].data_ptr() == weights["decoder.embed_tokens.weight"].data_ptr()
    # provenance
    record = state["extra_state"]["weight_pruning"][-1]
    assert record["settings"]["amount"] == 0.7 and record["settings"]["scope"] == "layer"
    assert record["heads"] == {"decoder.layers.1.encoder_attn": [2]}
    # the printed table is the file's sparsity
    total = sum(weights[k].numel() for k in record["tensors"])
    nz = sum(zeros(weights[k]) for k in record["tensors"])
    assert f"{nz:,}" in log and f"{total:,}" in log and "whole model" in log
    model, _ = load(out, data)
    assert zeros(model.decoder.layers[0].fc1.weight) == round(0.7 * 128 * 64)


def test_global_command_exact_and_runs_in_fairseq_generate(dense_checkpoint, tmp_path, capsys):
    data, ckpt = dense_checkpoint
    out = tmp_path / "global.pt"
    # in-process (the subprocess path is tested above); fairseq-generate below runs as its own process
    assert prune_main([str(ckpt), str(out), "--amount", "0.5", "--include", "encoder.layers.*",
                       "decoder.layers.*"]) == 0
    log = capsys.readouterr().out
    weights = torch.load(out, weights_only=True)["model"]
    linears = [k for k in weights if k.endswith(("_proj.weight", "fc1.weight", "fc2.weight"))
               and "output_projection" not in k]
    assert sum(zeros(weights[k]) for k in linears) == round(0.5 * sum(weights[k].numel() for k in linears))
    assert "50.00%" in log
    gen = H.run_fairseq("generate", [data, "--path", out, *USER_DIR, "--cpu", "--beam", "2", "--max-len-b", "10",
                                     "--batch-size", "16"])
    assert gen.count("\nH-") == 16 and "BLEU" in gen


def test_random_command_is_reproducible(dense_checkpoint, tmp_path, capsys):
    _, ckpt = dense_checkpoint
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):  # in-process: the subprocess path is tested above
        assert prune_main([str(ckpt), str(tmp_path / f"{name}.pt"), "--amount", "0.3", "--method", "random",
                           "--seed", str(seed)]) == 0
    assert "30.00%" in capsys.readouterr().out
    w = {n: torch.load(tmp_path / f"{n}.pt", weights_only=True)["model"]["encoder.layers.0.fc1.weight"]
         for n in "abc"}
    assert torch.equal(w["a"], w["b"]) and not torch.equal(w["a"], w["c"])


@pytest.mark.parametrize("flags, match", [
    (["--amount", "1.0"], "a fraction must be < 1"),
    (["--amount", "0.5", "--include", "*.fc9"], "matches no Linear module"),
    (["--amount", "0.5", "--exclude", "*.fc9"], "matches no Linear module"),
    (["--amount", "0.5", "--method", "magnitude"], "unknown method"),
    (["--heads", "encoder.layers.1.self_attn:9"], "head 9 is out of range"),
    ([], "nothing to prune"),
])
def test_command_rejects_bad_input(dense_checkpoint, tmp_path, capsys, flags, match):
    _, ckpt = dense_checkpoint
    with pytest.raises(SystemExit) as exit_:
        prune_main([str(ckpt), str(tmp_path / "x.pt"), *flags])
    assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_list_prints_module_and_attention_names(dense_checkpoint, capsys):
    _, ckpt = dense_checkpoint
    assert prune_main([str(ckpt), "--list"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layers.1.fc2: Linear (64, 128)" in out
    assert "decoder.layers.0.encoder_attn: 4 heads of 16" in out
