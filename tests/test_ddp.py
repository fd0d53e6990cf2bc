"""Two-process data-parallel fairseq training on CPU (gloo): every rank must end with the same parameters,
adaptive-span and learned-alpha parameters included (with LayerDrop too), and they must have moved.

Each rank runs ``fairseq_helpers.py ddp-worker``, which runs fairseq's training ``main`` in-process with
``--distributed-no-spawn`` and an explicit ``--distributed-rank``, then saves that rank's initial and final
``model.state_dict()`` (fairseq itself only saves checkpoints on rank 0).
"""
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

import fairseq_helpers as H


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON = ["--cpu", "--num-workers", "0", "--seed", "3", "--optimizer", "adam", "--lr", "0.01",
          "--max-tokens", "300", "--max-update", "4", "--no-save", "--disable-validation",
          "--log-format", "simple", "--log-interval", "1", "--no-progress-bar",
          "--distributed-world-size", "2", "--distributed-backend", "gloo", "--distributed-no-spawn"]


def run_two_ranks(translation_bin, tmp_path, model_args, ddp_backend="legacy_ddp"):
    """Train on two ranks; returns (per-rank saved states, per-rank logs)."""
    init_method = f"tcp://127.0.0.1:{free_port()}"
    common = [str(translation_bin), *model_args, *COMMON, "--ddp-backend", ddp_backend,
              "--distributed-init-method", init_method]
    logs, procs = [tmp_path / f"rank{r}.log" for r in (0, 1)], []
    for rank in (0, 1):
        with open(logs[rank], "w") as log:  # files, not pipes: a full pipe would block a rank
            procs.append(subprocess.Popen(
                [sys.executable, str(H.REPO / "tests" / "fairseq_helpers.py"), "ddp-worker", str(tmp_path), "--",
                 *common, "--distributed-rank", str(rank)],
                cwd=str(H.REPO), env=H.clean_env(), stdout=log, stderr=subprocess.STDOUT,
            ))
    deadline = time.monotonic() + 180
    try:
        # if one rank dies, the other would wait for it forever: stop as soon as any rank fails
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = [path.read_text() for path in logs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{log[-5000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)], logs


def assert_ranks_in_sync(states):
    assert [s["num_updates"] for s in states] == [4, 4]
    assert len({s["wrapper"] for s in states}) == 1
    ids0, ids1 = set(states[0]["sample_ids"]), set(states[1]["sample_ids"])
    assert ids0 and ids1 and ids0 != ids1, "the ranks must train on different batches"
    init0, final0 = states[0]["init"], states[0]["final"]
    init1, final1 = states[1]["init"], states[1]["final"]
    assert set(final0) == set(final1)
    for key in final0:
        torch.testing.assert_close(init0[key], init1[key], atol=0, rtol=0, msg=f"{key} differs at init")
        torch.testing.assert_close(final0[key], final1[key], atol=0, rtol=0, msg=f"{key} differs across ranks")


def test_two_rank_training_keeps_ranks_in_sync(translation_bin, tmp_path):
    states, logs = run_two_ranks(translation_bin, tmp_path, [
        "--arch", "transformer_adaptive_span_tiny",
        "--criterion", "adaptive_span_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--adapt-span-init", "0.5", "--adapt-span-loss-coeff", "0.01",
    ])
    assert_ranks_in_sync(states)
    init0, final0 = states[0]["init"], states[0]["final"]
    span_keys = [k for k in final0 if k.endswith("adaptive_span.current_val")]
    assert len(span_keys) == 4
    trainable = [k for k in final0 if k.endswith(("weight", "current_val")) and "version" not in k]
    moved = [k for k in trainable if not torch.equal(init0[k], final0[k])]
    assert set(span_keys) <= set(moved), "adaptive span parameters did not train"
    assert len(moved) >= 0.9 * len(trainable), sorted(set(trainable) - set(moved))
    # both ranks joined one process group of two; spans are logged as plain (rounded) numbers, not tensors
    for rank, log in enumerate(logs):
        assert f"distributed init (rank {rank})" in log, log[-3000:]
    train_line = [ln for ln in logs[0].splitlines() if "train_inner" in ln][-1]
    assert re.search(r"span_loss=[0-9.e-]+, span_avg=[0-9.]+, span_max=[0-9.]+,", train_line), train_line
    assert "tensor(" not in train_line


def test_two_rank_training_with_layerdrop_and_learned_alpha(translation_bin, tmp_path):
    """LayerDrop leaves dropped layers without gradients; with legacy_ddp (and fairseq reseeding every update on
    every rank) the ranks still end identical, and the learned alphas train and are logged."""
    states, logs = run_two_ranks(translation_bin, tmp_path, [
        "--arch", "transformer_alpha_entmax_tiny", "--alpha-init", "1.5",
        "--criterion", "fluence_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5",
    ])
    assert_ranks_in_sync(states)
    alpha_keys = [k for k in states[0]["final"] if k.endswith("pre_alpha")]
    assert len(alpha_keys) == 6
    assert any(not torch.equal(states[0]["init"][k], states[0]["final"][k]) for k in alpha_keys)
    train_line = [ln for ln in logs[0].splitlines() if "train_inner" in ln][-1]
    assert re.search(r"alpha_enc_self_0=1\.[0-9]+", train_line), train_line


def test_two_rank_training_with_fairseqs_default_c10d_backend_on_cpu(translation_bin, tmp_path):
    """fairseq's default --ddp-backend c10d passes device_ids=[0], which torch refuses for CPU parameters; the
    plugin builds torch's DDP without device ids on CPU, and the ranks end identical."""
    states, logs = run_two_ranks(translation_bin, tmp_path, [
        "--arch", "transformer_adaptive_span_tiny",
        "--criterion", "adaptive_span_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    ], ddp_backend="c10d")
    assert_ranks_in_sync(states)
    assert [s["wrapper"] for s in states] == ["DistributedDataParallel"] * 2  # torch's DDP, not fairseq's legacy


def test_bf16_on_cpu_stops_before_training_with_the_working_choices(translation_bin, tmp_path):
    with pytest.raises(AssertionError, match=r"--bf16 .* implies --tpu.*On CPU train in float32.*--fp16"):
        H.run_fairseq("train", [translation_bin, "--user-dir", "fluence_fairseq", "--arch",
                                "transformer_adaptive_span_tiny", "--bf16", *H.tiny_train_flags(tmp_path, 2)])
    assert not (tmp_path / "checkpoint_last.pt").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
