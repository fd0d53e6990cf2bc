"""compute_attn_score: average attention patterns of a fluence model over data.

The averages must equal a brute-force mean over sentences run one by one without any padding, so padding never
counts and left-padded sources are aligned to their first real token."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fairseq_helpers as H
from fluence_fairseq.cli.attn_score import main
from fluence_fairseq.pruning.collect import AttentionPatternCollector, collect_attention_patterns, find_attentions
from fluence_fairseq.modules.attention_base import FluenceAttention

SMALL = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
         "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--encoder-ffn-embed-dim", "32",
         "--decoder-ffn-embed-dim", "32", "--dropout", "0.3", "--attention-dropout", "0.3"]


def _translation_batch(task, src_lengths, tgt_lengths, src_len=9, tgt_len=7, seed=0):
    """Left-padded sources and right-padded decoder inputs of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    bsz = len(src_lengths)
    src = H.random_tokens(task, bsz, src_len, g)
    prev = H.random_tokens(task, bsz, tgt_len, g)
    for b, (n, m) in enumerate(zip(src_lengths, tgt_lengths)):
        src[b, : src_len - n] = d.pad()
        src[b, -1] = d.eos()
        prev[b, 0] = d.eos()
        prev[b, m:] = d.pad()
    return {"id": torch.arange(bsz), "nsentences": bsz,
            "net_input": {"src_tokens": src, "src_lengths": torch.tensor(src_lengths), "prev_output_tokens": prev}}


def _single_sentences(sample, pad):
    """Every sentence of a batch alone, padding removed."""
    net = sample["net_input"]
    for b in range(net["src_tokens"].size(0)):
        src = net["src_tokens"][b][net["src_tokens"][b].ne(pad)].unsqueeze(0)
        one = {"src_tokens": src, "src_lengths": torch.tensor([src.size(1)])}
        if "prev_output_tokens" in net:
            prev = net["prev_output_tokens"][b]
            one["prev_output_tokens"] = prev[prev.ne(pad)].unsqueeze(0)
        yield one


def _brute_force(model, samples, pad, max_len):
    """type -> (L, H, N, N) mean over the sentences that have query i and key j, each run alone in eval mode."""
    found = find_attentions(model)
    model.eval()
    sums, counts = {}, {}
    for sample in samples:
        for one in _single_sentences(sample, pad):
            weights = {}
            for t, entries in found.items():
                for layer, _, module in entries:
                    module.weight_recorder = (lambda t, layer: lambda m, w: weights.__setitem__((t, layer), w))(t, layer)
            try:
                with torch.no_grad():
                    model(**one)
            finally:
                for entries in found.values():
                    for _, _, module in entries:
                        module.weight_recorder = None
            for t, entries in found.items():
                w = torch.stack([weights[(t, layer)][0] for layer, _, _ in entries]).double()  # (L, H, Lq, Lk)
                nq, nk = min(w.size(2), max_len), min(w.size(3), max_len)
                s = sums.setdefault(t, torch.zeros(w.size(0), w.size(1), max_len, max_len, dtype=torch.float64))
                c = counts.setdefault(t, torch.zeros(max_len, max_len, dtype=torch.float64))
                s[:, :, :nq, :nk] += w[:, :, :nq, :nk]
                c[:nq, :nk] += 1
    return {t: sums[t] / counts[t].clamp(min=1) for t in sums}, counts


def test_translation_averages_equal_brute_force_mean_over_unpadded_sentences():
    model, task, _ = H.build("fluence_transformer", SMALL)
    pad = task.source_dictionary.pad()
    samples = [_translation_batch(task, [9, 6, 4, 7], [7, 3, 5, 6], seed=0),
               _translation_batch(task, [3, 8], [2, 7], seed=1)]
    model.train()  # dropout is on: collecting must switch it off and switch training back on afterwards
    acc = collect_attention_patterns(model, samples, max_len=8)  # < the longest source: positions 8+ dropped
    assert model.training and all(m.training for m in model.modules())
    assert all(m.weight_recorder is None for m in model.modules() if isinstance(m, FluenceAttention))
    assert set(acc) == {"self-enc", "self-dec", "enc-dec"}
    expected, counts = _brute_force(model, samples, pad, max_len=8)
    for t in acc:
        assert acc[t].sentences == 6
        assert acc[t].averages().shape == (2, 2, 8, 8)
        torch.testing.assert_close(acc[t].counts, counts[t], atol=0, rtol=0)
        torch.testing.assert_close(acc[t].averages(), expected[t], atol=1e-5, rtol=0)
    # spot checks of the alignment: source position 0 is the first real token; 6 sentences have source position 0
    # and decoder position 0; only the 9- and 8-token sources reach position 7
    assert acc["self-enc"].counts[0, 0] == 6 and acc["self-enc"].counts[7, 7] == 2
    # queries at 4: targets 7, 5, 6, 7 (sentences 0, 2, 3, 5); keys at 6: sources 9, 7, 8 (0, 3, 5)
    assert acc["enc-dec"].counts[4, 6] == 3
    # the causal decoder never attends ahead, and each real query's row sums to 1
    dec = acc["self-dec"].averages()
    assert float(dec[:, :, 0, 1:].abs().max()) == 0.0
    torch.testing.assert_close(dec[:, :, :7, :7].sum(-1), torch.ones(2, 2, 7, dtype=torch.float64))


def test_padding_is_never_counted_and_types_can_be_chosen():
    model, task, _ = H.build("fluence_transformer", SMALL)
    sample = _translation_batch(task, [9, 2], [7, 2])
    alone = _translation_batch(task, [9], [7])
    alone["net_input"] = {k: v[:1] for k, v in sample["net_input"].items()}
    both = collect_attention_patterns(model, [sample], max_len=9, types="self-enc,enc-dec")
    first = collect_attention_patterns(model, [alone], max_len=9, types=["self-enc", "enc-dec"])
    assert set(both) == {"self-enc", "enc-dec"}
    # beyond the short sentence's length the averages are those of the long sentence alone
    for t in both:
        torch.testing.assert_close(both[t].averages()[:, :, 2:, 2:], first[t].averages()[:, :, 2:, 2:], atol=1e-6,
                                   rtol=0)
        assert both[t].counts[0, 0] == 2 and both[t].counts[2, 2] == 1


def test_language_model_patterns(tmp_path):
    model, task, _ = H.build("transformer_lm_local_tiny", ["--dropout", "0.2"])
    pad = task.source_dictionary.pad()
    samples = []
    for seed, lengths in ((0, [12, 5, 9]), (1, [3, 12])):
        s = H.lm_sample(task, bsz=len(lengths), length=12, seed=seed)
        for b, n in enumerate(lengths):  # right-padded, as language_modeling with --sample-break-mode eos
            s["net_input"]["src_tokens"][b, n:] = pad
        samples.append(s)
    acc = collect_attention_patterns(model, samples, max_len=10)
    assert set(acc) == {"self-dec"}
    expected, counts = _brute_force(model, samples, pad, max_len=10)
    torch.testing.assert_close(acc["self-dec"].counts, counts["self-dec"], atol=0, rtol=0)
    torch.testing.assert_close(acc["self-dec"].averages(), expected["self-dec"], atol=1e-5, rtol=0)
    assert acc["self-dec"].sentences == 5
    with pytest.raises(ValueError, match="no self-enc attention; it has self-dec"):
        collect_attention_patterns(model, samples, max_len=10, types="self-enc")
    with pytest.raises(ValueError, match="unknown attention type"):
        collect_attention_patterns(model, samples, max_len=10, types="encoder")


def test_attention_without_probabilities_is_a_clear_error():
    model, task, _ = H.build("transformer_performer_tiny", ["--cross-attention", "softmax"])
    model.train()
    with pytest.raises(ValueError, match="does not form attention probabilities"):
        collect_attention_patterns(model, [_translation_batch(task, [9, 4], [7, 3])], max_len=8)
    assert model.training  # state restored and recorders removed even after the error
    assert all(m.weight_recorder is None for m in model.modules() if isinstance(m, FluenceAttention))
    # its softmax cross attention alone can be collected
    acc = collect_attention_patterns(model, [_translation_batch(task, [9, 4], [7, 3])], max_len=8, types="enc-dec")
    assert acc["enc-dec"].sentences == 2


def test_model_without_fluence_attention_is_refused():
    model, _, _ = H.build("transformer_tiny")
    with pytest.raises(ValueError, match="no fluence attention"):
        AttentionPatternCollector(model, 8)


# ------------------------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def tiny_checkpoint(translation_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("attn_score_ckpt")
    H.run_fairseq("train", [translation_bin, "--user-dir", "fluence_fairseq", "--arch", "fluence_transformer",
                            *SMALL, "--criterion", "cross_entropy", *H.tiny_train_flags(save, 2),
                            "--disable-validation"])
    return translation_bin, save / "checkpoint_last.pt"


def test_command_writes_patterns_for_every_type(tiny_checkpoint, tmp_path):
    data, ckpt = tiny_checkpoint
    out = tmp_path / "patterns"
    cmd = [sys.executable, "-m", "fluence_fairseq.cli.attn_score", str(data), "--path", str(ckpt),
           "--subset", "train", "--out", str(out), "--max-len", "20", "--max-tokens", "300", "--cpu"]
    proc = subprocess.run(cmd, cwd=str(H.REPO), env=H.clean_env(PYTHONWARNINGS="default"), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "found in sys.modules" not in proc.stdout
    from fairseq.data import Dictionary, data_utils

    src = data_utils.load_indexed_dataset(str(data / "train.in-out.in"), Dictionary.load(str(data / "dict.in.txt")))
    tgt = data_utils.load_indexed_dataset(str(data / "train.in-out.out"), Dictionary.load(str(data / "dict.out.txt")))
    src_sizes, tgt_sizes = np.asarray(src.sizes), np.asarray(tgt.sizes)
    n = len(src_sizes)
    for t, (q_sizes, k_sizes) in {"self-enc": (src_sizes, src_sizes), "self-dec": (tgt_sizes, tgt_sizes),
                                  "enc-dec": (tgt_sizes, src_sizes)}.items():
        array = np.load(out / f"{t}.npy", allow_pickle=False)
        meta = json.loads((out / f"{t}.json").read_text())
        assert array.shape == (2, 2, 20, 20) and array.dtype == np.float32
        for key in ("format_version", "layout", "shape", "counts", "sentences", "checkpoint", "data", "split",
                    "max_len", "max_tokens", "batch_size", "arch", "attention", "type", "layers", "heads"):
            assert key in meta, key
        assert meta["type"] == t and meta["split"] == "train" and meta["max_len"] == 20 and meta["heads"] == 2
        assert meta["layers"] == [0, 1] and meta["arch"] == "fluence_transformer" and meta["attention"] == "softmax"
        assert meta["checkpoint"] == str(ckpt) and meta["max_tokens"] == 300
        counts = np.asarray(meta["counts"])
        assert meta["sentences"] == n == counts[0, 0] == 120
        # counts[i, j] = sentences with a query at i and a key at j (decoder inputs are as long as targets)
        expected = ((q_sizes[:, None, None] > np.arange(20)[None, :, None])
                    & (k_sizes[:, None, None] > np.arange(20)[None, None, :])).sum(0)
        np.testing.assert_array_equal(counts, expected)
        seen = counts > 0
        assert np.all(array[:, :, ~seen] == 0)
        # every sentence's query row sums to 1 over its keys (all fit in 20), so sum_j mean[i, j] * counts[i, j]
        # is the number of sentences with a query at i
        np.testing.assert_allclose((array * counts).sum(-1), np.broadcast_to(counts[:, 0], (2, 2, 20)), rtol=1e-4)


def test_command_on_a_language_model_checkpoint(lm_bin, tmp_path):
    save = tmp_path / "lm_ckpt"
    H.run_fairseq("train", [lm_bin, "--user-dir", "fluence_fairseq", "--task", "language_modeling", "--arch",
                            "transformer_lm_local_tiny", "--criterion", "cross_entropy", "--tokens-per-sample", "48",
                            "--sample-break-mode", "eos", *H.tiny_train_flags(save, 2), "--disable-validation"])
    out = tmp_path / "patterns"
    assert main([str(lm_bin), "--path", str(save / "checkpoint_last.pt"), "--subset", "valid", "--out", str(out),
                 "--batch-size", "4", "--cpu", "--log-format", "none"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["self-dec.json", "self-dec.npy"]
    array = np.load(out / "self-dec.npy", allow_pickle=False)
    meta = json.loads((out / "self-dec.json").read_text())
    # max_len defaults to the model's max positions (tokens_per_sample 48); 16 validation lines of 6..20 letters
    assert array.shape == (2, 4, 48, 48) and meta["max_len"] == 48 and meta["batch_size"] == 4
    assert meta["sentences"] == 16 == meta["counts"][0][0] and meta["attention"] == "local"
    assert meta["task"] == "language_modeling" and meta["arch"] == "transformer_lm_local_tiny"
    assert float(np.abs(np.triu(array, 1)).max()) == 0.0  # causal


def test_command_errors_are_clear(tiny_checkpoint, tmp_path, capsys):
    data, ckpt = tiny_checkpoint
    with pytest.raises(SystemExit):
        main([str(data), "--path", str(ckpt), "--out", str(tmp_path), "--types", "decoder"])
    assert "unknown attention type" in capsys.readouterr().err
