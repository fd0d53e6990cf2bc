"""Diagnostics of compare.py runs: the validation-loss curve of each run and, for learned-α runs, how far every
head's α moved from its initial value.

    PATH="$PWD/.venv/bin:$PATH" python examples/translation/sparse_diagnostics.py \\
        examples/translation/work/compare/softmax examples/translation/work/compare/alpha_entmax ...

The initial α is rebuilt, not stored: the run's model is built again the way ``fairseq-train`` builds it (the same
arguments, its ``--train-args`` included, ``--seed`` set before the task and model are made), so its ``pre_alpha``
draws are the run's own.
"""
import argparse
import json
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))


def valid_curve(log: str):
    """[(updates, validation loss)] from a fairseq-train log."""
    found = re.findall(r"valid on 'valid' subset \| loss ([\d.]+) .*?num_updates (\d+)", log)
    return [(int(updates), float(loss)) for loss, updates in found]


def initial_model(run: Path, result: dict):
    """The model of ``run`` as fairseq-train built it before the first update."""
    import numpy as np
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import compare

    dim = result["dim"]
    argv = [str(run.parent.parent / "bin"), "--user-dir", str(HERE.parent.parent / "fluence_fairseq"),
            "--arch", compare.arch_of(result["name"]), "--encoder-embed-dim", str(dim), "--decoder-embed-dim",
            str(dim), "--encoder-ffn-embed-dim", str(4 * dim), "--decoder-ffn-embed-dim", str(4 * dim),
            "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy", "--dropout", "0.1", "--cpu",
            "--seed", str(result.get("seed", 1)), *shlex.split(result.get("train_args", ""))]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)  # as fairseq_cli.train does before setup_task and build_model
    return tasks.setup_task(cfg.task).build_model(cfg.model)


def alpha_drift(run: Path, result: dict):
    """[(attention, initial alphas, final alphas)] of a learned-α run."""
    import torch

    from fluence_fairseq.modules.entmax import AlphaEntmaxAttention

    model = initial_model(run, result)
    heads = {name: m for name, m in model.named_modules() if isinstance(m, AlphaEntmaxAttention)}
    initial = {name: m.alpha().detach().clone() for name, m in heads.items()}
    # the final α from the same modules, so that every parametrisation option of the run is honoured
    final = torch.load(run / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    model.load_state_dict(final)
    return [(name, initial[name], m.alpha().detach()) for name, m in heads.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="compare.py run directories (work/compare/<name>[-seed<N>])")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    for run in map(Path, args.runs):
        result = json.loads((run / "result.json").read_text())
        curve = ", ".join(f"{u}: {loss:.3f}" for u, loss in valid_curve((run / "train.log").read_text()))
        print(f"{run.name} (seed {result.get('seed', 1)}): valid loss by update {curve}")
        if result["name"] != "alpha_entmax":
            continue
        rows = alpha_drift(run, result)
        import torch

        change = torch.cat([final - start for _, start, final in rows])
        for attention, start, final in rows:
            print(f"  {attention}: alpha {' '.join(f'{a:.2f}' for a in start.tolist())} -> "
                  f"{' '.join(f'{a:.2f}' for a in final.tolist())}")
        print(f"  alpha change over {change.numel()} heads: mean {change.mean():+.3f}, "
              f"{int((change < 0).sum())} down, {int((change > 0).sum())} up, largest |change| "
              f"{change.abs().max():.3f}")


if __name__ == "__main__":
    main()
