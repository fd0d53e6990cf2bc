"""``--task fluence_lm_stream``: streams cut into rows, segments in order, memory carried and reset per split, ranks
with their own rows, eval-lm scoring the whole stream with memory, and clear errors for models that cannot stream."""
import argparse
import re

import pytest
import torch

import fairseq_helpers as H
from test_ddp import run_two_ranks


def test_segments_continue_each_row_and_ranks_get_their_own_rows():
    from fluence_fairseq.tasks.lm_stream import StreamSegments

    stream = torch.arange(103)
    seg = StreamSegments(stream, rows=2, segment=8, split="train", pad=1, num_shards=2, shard_id=1)
    assert seg.row_len == 25 and len(seg) == 4  # (103 - 1) // 4 rows; segments of 8, 8, 8, 1
    rows = torch.cat([seg[i]["net_input"]["src_tokens"] for i in range(len(seg))], dim=1)
    targets = torch.cat([seg[i]["target"] for i in range(len(seg))], dim=1)
    assert torch.equal(rows, torch.stack([torch.arange(50, 75), torch.arange(75, 100)]))  # rows 2 and 3 of 4
    assert torch.equal(targets, rows + 1) and seg[3]["ntokens"] == 2 and seg[0]["segment"] == 0
    other = StreamSegments(stream, rows=2, segment=8, split="train", pad=1, num_shards=2, shard_id=0)
    assert torch.equal(other[0]["net_input"]["src_tokens"][:, 0], torch.tensor([0, 25]))
    with pytest.raises(ValueError, match="too few for 200 rows"):
        StreamSegments(stream, rows=100, segment=8, split="valid", pad=1, num_shards=2)


def _task_and_model(lm_bin, checkpoint=None, extra=()):
    from fairseq import checkpoint_utils, options, tasks

    if checkpoint is not None:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
        return task, models[0].eval()
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(lm_bin), *H.stream_args(extra), "--cpu"])
    task = tasks.setup_task(args)
    return task, task.build_model(args).eval()


def test_scoring_with_memory_equals_one_pass_over_the_stream(lm_bin, stream_checkpoint):
    task, model = _task_and_model(lm_bin, stream_checkpoint[0])
    task.load_dataset("valid")
    stream = task.streams["valid"]
    with torch.no_grad():
        full = model.get_normalized_probs(model(stream[None, :-1]), log_probs=True)[0]
        want = full.gather(-1, stream[1:, None]).squeeze(-1)
        got = []
        for sample in task.get_batch_iterator(task.dataset("valid"), max_sentences=1).next_epoch_itr(shuffle=False):
            memory = task.memory(sample)
            with memory.attached(model):
                out = model(**sample["net_input"])
            got.append(model.get_normalized_probs(out, log_probs=True)[0].gather(-1, sample["target"][0, :, None]))
    got = torch.cat(got).squeeze(-1)
    assert got.numel() == stream.numel() - 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the CLI scores the same tokens the same way
    log = H.run_fairseq("eval_lm", [lm_bin, "--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream",
                                    "--path", stream_checkpoint[0], "--batch-size", "1", "--cpu",
                                    "--tokens-per-sample", "16", "--gen-subset", "valid"])
    assert f"Evaluated {stream.numel() - 1} tokens" in log
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", log).group(1))
    assert loss == pytest.approx(float(-want.mean() / torch.log(torch.tensor(2.0))), abs=2e-3)


def test_memory_is_per_split_and_resets_at_every_pass(lm_bin):
    task, model = _task_and_model(lm_bin)
    for split in ("train", "valid"):
        task.load_dataset(split)
    train = list(task.get_batch_iterator(task.dataset("train"), max_sentences=4).next_epoch_itr(shuffle=False))
    valid = list(task.get_batch_iterator(task.dataset("valid"), max_sentences=2).next_epoch_itr(shuffle=False))
    memory = task.memory(train[0])
    with memory.attached(model), torch.no_grad():
        model(**train[0]["net_input"])
    held = {path: dict(state) for path, state in memory.states.items()}
    assert held and memory.rows == 4
    valid_memory = task.memory(valid[0])
    assert valid_memory is not memory and not valid_memory.states
    with valid_memory.attached(model), torch.no_grad():
        model(**valid[0]["net_input"])
    assert all(memory.states[p][k] is t for p, s in held.items() for k, t in s.items())  # training untouched
    assert task.memory(train[1]) is memory and memory.states  # the next segment continues
    assert not task.memory(train[0]).states  # a new pass starts afresh
    # a batch of fewer rows continues the first streams; more rows cannot and start afresh
    with memory.attached(model), torch.no_grad():
        model(**train[0]["net_input"])
    memory.fit_rows(3)
    assert memory.rows == 3
    memory.fit_rows(5)
    assert memory.rows is None
    assert task.memory({"id": torch.arange(2)}) is None  # fairseq's dummy batches run without memory


@pytest.mark.parametrize("extra,match", [
    (["--arch", "transformer_lm_local_tiny"], None),
    (["--arch", "fluence_transformer_lm_tiny", "--no-token-positional-embeddings"], "--mem-len"),
    (["--arch", "transformer_lm_longshort_tiny", "--no-token-positional-embeddings"], "LongShort.*--mem-len"),
    (["--arch", "transformer_lm_cosformer_tiny", "--no-token-positional-embeddings"], "cosformer_max_len"),
])
def test_models_that_cannot_stream_are_refused_naming_the_fix(lm_bin, extra, match):
    from fairseq import options, tasks

    parser = options.get_training_parser()
    flags = [str(lm_bin), "--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream", "--tokens-per-sample", "16",
             "--batch-size", "2", *extra, "--cpu"]
    args = options.parse_args_and_arch(parser, flags)
    task = tasks.setup_task(args)
    with pytest.raises(ValueError, match=match or "--no-token-positional-embeddings"):
        task.build_model(args)


@pytest.mark.parametrize("extra,blind", [
    (["--arch", "transformer_lm_performer_tiny"], "PerformerAttention: pass --attn-position-bias alibi"),
    (["--arch", "transformer_lm_performer_tiny", "--attn-position-bias", "alibi"], None),
    (["--arch", "transformer_lm_abc_tiny"], "ABCAttention: pass --attn-position-bias alibi"),
    (["--arch", "fluence_transformer_lm_tiny", "--mem-len", "16"], "--attn-position-bias alibi"),
    (["--arch", "fluence_transformer_lm_tiny", "--mem-len", "16", "--attn-position-bias", "alibi"], None),
    (["--arch", "transformer_lm_s4d_tiny"], None),
])
def test_a_model_that_cannot_see_token_order_is_warned_about(lm_bin, extra, blind, caplog):
    """Without position embeddings, ALiBi-capable attentions (Performer and ABC included: a decay of their prefix
    sums) see a bag of the prefix unless ALiBi is on: the task says so when it builds the model."""
    from fairseq import options, tasks

    parser = options.get_training_parser()
    flags = [str(lm_bin), "--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream", "--tokens-per-sample", "16",
             "--batch-size", "2", "--no-token-positional-embeddings", *extra, "--cpu"]
    args = options.parse_args_and_arch(parser, flags)
    with caplog.at_level("WARNING"):
        tasks.setup_task(args).build_model(args)
    warned = [r.getMessage() for r in caplog.records if "get no token order" in r.getMessage()]
    if blind is None:
        assert not warned
    else:
        assert len(warned) == 1 and blind in warned[0]


def test_mem_len_flag_is_validated_at_parse_time():
    from fairseq import options

    parser = options.get_training_parser()
    with pytest.raises(SystemExit):
        options.parse_args_and_arch(parser, ["data", "--user-dir", "fluence_fairseq", "--task", "language_modeling",
                                             "--arch", "fluence_transformer_lm_tiny", "--mem-len", "0"])


def test_two_ranks_train_on_their_streams_and_stay_identical(lm_bin, tmp_path):
    states, logs = run_two_ranks(lm_bin, tmp_path, ["--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream",
                                                    *H.STREAM_MODEL, "--tokens-per-sample", "16", "--batch-size", "2",
                                                    "--criterion", "cross_entropy"])
    for key in states[0]["final"]:
        torch.testing.assert_close(states[0]["final"][key], states[1]["final"][key], atol=0, rtol=0)
    assert any(not torch.equal(states[0]["init"][k], states[0]["final"][k]) for k in states[0]["init"])
    assert states[0]["num_updates"] == states[1]["num_updates"] == 4


def test_without_memory_every_segment_starts_afresh(lm_bin, stream_checkpoint):
    task, model = _task_and_model(lm_bin, stream_checkpoint[0])
    task.args.stream_without_memory = True
    task.load_dataset("valid")
    batches = list(task.get_batch_iterator(task.dataset("valid"), max_sentences=1).next_epoch_itr(shuffle=False))
    memory = task.memory(batches[0])
    with memory.attached(model), torch.no_grad():
        model(**batches[0]["net_input"])
    assert memory.states and not task.memory(batches[1]).states


def test_generation_continues_a_prompt_like_any_language_model(lm_bin, stream_checkpoint):
    prompt = " ".join((lm_bin.parent / "raw_lm" / "valid.txt").read_text().split()[:3])
    log = H.run_fairseq("interactive", [lm_bin, "--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream",
                                        "--path", stream_checkpoint[0], "--beam", "2", "--cpu", "--max-len-b", "8",
                                        "--tokens-per-sample", "16"], input=prompt + "\n")
    hypothesis = next(line for line in log.splitlines() if line.startswith("H-0"))
    assert hypothesis.split("\t")[2].startswith(prompt) and len(hypothesis.split("\t")[2].split()) > 3
