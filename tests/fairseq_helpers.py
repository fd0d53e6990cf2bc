"""Test helpers for running fluence_fairseq models inside fairseq: in-memory models on a dummy task, tiny random
character data, and the fairseq command-line tools run as subprocesses of this interpreter.

Also a command-line entry point (``python fairseq_helpers.py ddp-worker OUT -- <fairseq-train args>``) that runs
one rank of fairseq training in-process and saves that rank's initial and final model state dicts.
"""
import argparse
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fluence_fairseq  # noqa: E402,F401  (registers models, archs and criterions)
from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import ARCH_MODEL_REGISTRY  # noqa: E402
from fairseq.models import build_model as fairseq_build_model  # noqa: E402
from fairseq.tasks import FairseqTask  # noqa: E402

# --------------------------------------------------------------------------------------------- in memory
VOCAB = 50


def dummy_dictionary(n_symbols: int = VOCAB) -> Dictionary:
    d = Dictionary()
    for i in range(n_symbols):
        d.add_symbol(f"w{i}")
    d.finalize(padding_factor=1)
    return d


class FluenceDummyTask(FairseqTask):
    """A task with one shared dictionary and nothing else, to build models without data."""

    def __init__(self, args, dictionary: Optional[Dictionary] = None):
        super().__init__(args)
        self.dictionary = dictionary or dummy_dictionary()

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


def model_args(arch: str, extra: Sequence[str] = ()) -> argparse.Namespace:
    """Parse ``extra`` model flags for ``arch`` the way fairseq-train does (no argparse defaults)."""
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    args = parser.parse_args(list(extra))
    args.arch = arch
    return args


def build(arch: str, extra: Sequence[str] = (), task: Optional[FluenceDummyTask] = None, seed: int = 0):
    """(model, task, args): ``arch`` built through fairseq's ``build_model`` (which runs the arch function)."""
    torch.manual_seed(seed)
    args = model_args(arch, extra)
    task = task or FluenceDummyTask(args)
    model = fairseq_build_model(args, task)
    return model, task, args


def random_tokens(task, bsz: int, length: int, generator=None) -> torch.Tensor:
    d = task.source_dictionary
    return torch.randint(d.nspecial, len(d), (bsz, length), generator=generator)


def translation_sample(task, bsz=3, src_len=9, tgt_len=7, seed=0, left_pad_lengths=(9, 6, 4)) -> Dict:
    """A fairseq translation batch: left-padded sources of the given lengths, full-length targets."""
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    src = random_tokens(task, bsz, src_len, g)
    lengths = torch.tensor(list(left_pad_lengths)[:bsz])
    for b, n in enumerate(lengths.tolist()):
        src[b, : src_len - n] = d.pad()
        src[b, -1] = d.eos()
    tgt = random_tokens(task, bsz, tgt_len, g)
    tgt[:, -1] = d.eos()
    prev = torch.cat([torch.full((bsz, 1), d.eos()), tgt[:, :-1]], dim=1)
    return {
        "id": torch.arange(bsz),
        "nsentences": bsz,
        "ntokens": int(tgt.ne(d.pad()).sum()),
        "net_input": {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev},
        "target": tgt,
    }


def lm_sample(task, bsz=2, length=12, seed=0) -> Dict:
    g = torch.Generator().manual_seed(seed)
    tokens = random_tokens(task, bsz, length + 1, g)
    return {
        "id": torch.arange(bsz),
        "nsentences": bsz,
        "ntokens": bsz * length,
        "net_input": {"src_tokens": tokens[:, :-1].contiguous(), "src_lengths": torch.full((bsz,), length)},
        "target": tokens[:, 1:].contiguous(),
    }


# ----------------------------------------------------------------------------------------------- data
LETTERS = "abcdefghij"


def _sentence(rng: random.Random, lo=4, hi=14) -> List[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]


def create_translation_data(root: Path, n_train=120, n_valid=16, seed=1) -> Path:
    """Random character sentences ``*.in`` and a deterministic 'translation' ``*.out`` (reversed, shifted)."""
    rng = random.Random(seed)
    raw = Path(root) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    shift = {c: LETTERS[(i + 3) % len(LETTERS)] for i, c in enumerate(LETTERS)}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        src, tgt = [], []
        for _ in range(n):
            s = _sentence(rng)
            src.append(" ".join(s))
            tgt.append(" ".join(shift[c] for c in reversed(s)))
        (raw / f"{split}.in").write_text("\n".join(src) + "\n")
        (raw / f"{split}.out").write_text("\n".join(tgt) + "\n")
    return raw


def create_lm_data(root: Path, n_train=150, n_valid=16, seed=2) -> Path:
    rng = random.Random(seed)
    raw = Path(root) / "raw_lm"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        lines = [" ".join(_sentence(rng, 6, 20)) for _ in range(n)]
        (raw / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return raw


def load_script(relative_path: str, name: str):
    """A repository script that is not part of a package (docs/generate.py, scripts/*.py), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------- CLI
def clean_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def run_fairseq(tool: str, args: Sequence[str], *, cwd=REPO, env=None, input: Optional[str] = None,
                timeout: int = 240) -> str:
    """Run ``fairseq_cli.<tool>`` (train, generate, interactive, preprocess, eval_lm, validate) with this
    interpreter; return stdout+stderr, failing with its tail on a nonzero exit."""
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=str(cwd), env=env or clean_env(), input=input, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"fairseq_cli.{tool} exited with {proc.returncode}\n$ {' '.join(cmd)}\n(cwd {cwd})\n"
            + proc.stdout[-6000:]
        )
    return proc.stdout


def preprocess_translation(raw: Path, dest: Path, **kw) -> Path:
    run_fairseq("preprocess", [
        "--source-lang", "in", "--target-lang", "out",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--joined-dictionary", "--destdir", dest, "--workers", "1",
    ], **kw)
    return dest


def preprocess_lm(raw: Path, dest: Path, **kw) -> Path:
    run_fairseq("preprocess", [
        "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
        "--testpref", raw / "test.txt", "--destdir", dest, "--workers", "1",
    ], **kw)
    return dest


def tiny_train_flags(save_dir: Path, max_update: int = 8) -> List[str]:
    """Training flags shared by the tiny CLI runs: CPU, few updates, small batches, no data workers."""
    return [
        "--cpu", "--num-workers", "0", "--seed", "1",
        "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2",
        "--max-tokens", "400", "--max-update", str(max_update), "--log-format", "simple", "--log-interval", "2",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-progress-bar",
    ]


#: a stream LM whose local window (4) fits the 16-token segment: scoring with memory equals one pass exactly
STREAM_ARCH = "transformer_lm_local_tiny"
STREAM_MODEL = ["--arch", STREAM_ARCH, "--no-token-positional-embeddings", "--attn-position-bias", "alibi"]


def stream_args(extra=()) -> List[str]:
    """``fluence_lm_stream`` training flags of the tiny stream LM (segments of 16, 4 rows)."""
    return ["--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream", *STREAM_MODEL, "--tokens-per-sample", "16",
            "--batch-size", "4", "--criterion", "cross_entropy", *extra]


# ----------------------------------------------------------------------------------------- DDP worker
def ddp_worker(out: Path, train_args: List[str]) -> None:
    """One rank of fairseq training, in-process; saves ``out/rank<R>.pt`` with the model's initial and final state
    dicts, the number of updates and the ids of the training samples this rank saw."""
    import fairseq.trainer
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    captured = {}
    original_init = fairseq.trainer.Trainer.__init__

    def capturing_init(self, cfg, task, model, criterion, *args, **kwargs):
        captured["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        original_init(self, cfg, task, model, criterion, *args, **kwargs)
        captured["trainer"] = self

    original_train_step = fairseq.trainer.Trainer.train_step
    seen_ids = []

    def recording_train_step(self, samples, *args, **kwargs):
        seen_ids.extend(int(i) for s in samples if s and "id" in s for i in s["id"])
        return original_train_step(self, samples, *args, **kwargs)

    fairseq.trainer.Trainer.__init__ = capturing_init
    fairseq.trainer.Trainer.train_step = recording_train_step
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=train_args)
    cfg = convert_namespace_to_omegaconf(args)
    distributed_utils.call_main(cfg, train.main)
    trainer = captured["trainer"]
    out.mkdir(parents=True, exist_ok=True)
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    rank = cfg.distributed_training.distributed_rank
    wrapper = type(getattr(trainer.model, "module", trainer.model)).__name__  # inside fairseq's ModuleProxyWrapper
    torch.save({"init": captured["init"], "final": final, "num_updates": trainer.get_num_updates(), "rank": rank,
                "sample_ids": seen_ids, "wrapper": wrapper}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "ddp-worker" or "--" not in sys.argv:
        sys.exit("usage: fairseq_helpers.py ddp-worker OUT_DIR -- <fairseq-train arguments>")
    split = sys.argv.index("--")
    ddp_worker(Path(sys.argv[2]), sys.argv[split + 1:])
