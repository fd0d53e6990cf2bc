"""The commands in the README and the docs work as written.

Every ``fairseq-*`` and ``python -m fluence_fairseq.cli.*`` line of their shell blocks must parse (flags that
exist, values in range); the README's tour (train, generate, interactive; train and eval-lm for a language
model) and the workflow of every docs page with one run as written on tiny data, with only the sizes and the
number of updates appended, and every test sentence must be translated and every test token scored.
"""
import os
import re
import shlex
from pathlib import Path

import pytest

import fairseq_helpers as H

DOCS = [H.REPO / "README.md", *sorted((H.REPO / "docs").glob("*.md"))]
FAIRSEQ_PARSERS = {"fairseq-train": "get_training_parser", "fairseq-generate": "get_generation_parser",
                   "fairseq-interactive": "get_interactive_generation_parser",
                   "fairseq-eval-lm": "get_eval_lm_parser"}


def documented_commands(path: Path, templates: bool = False):
    """(tool, argv) of every command line in the shell blocks of ``path`` (continuations joined, comments cut);
    synopsis lines with ``[optional]`` parts or ``...`` are templates, not commands. With ``templates``, a line
    that only ends in `` ...`` (the rest of a training command left to the reader) is kept without it."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" # ")[0].strip()
            if templates and line.endswith(" ...") and "..." not in line[:-4]:
                line = line[:-4]
            if not re.match(r"(fairseq-|python -m fluence_fairseq\.cli\.)", line) or "[" in line or "..." in line:
                continue
            words = shlex.split(line)
            tool = words[2] if words[0] == "python" else words[0]
            out.append((tool, words[3:] if words[0] == "python" else words[1:]))
    return out


COMMANDS = [(path.name, tool, argv) for path in DOCS for tool, argv in documented_commands(path)]


def test_the_docs_have_commands():
    tools = {tool for _, tool, _ in COMMANDS}
    assert {"fairseq-train", "fairseq-generate", "fairseq-interactive", "fairseq-eval-lm"} <= tools
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("doc,tool,argv", COMMANDS, ids=[f"{d}:{t}:{i}" for i, (d, t, _) in enumerate(COMMANDS)])
def test_documented_command_parses(doc, tool, argv, capsys, tmp_path, monkeypatch):
    import importlib

    from fairseq import options

    # the files an earlier documented step writes (pattern arrays, checkpoints) exist when this one runs
    monkeypatch.chdir(tmp_path)
    os.symlink(H.REPO / "fluence_fairseq", tmp_path / "fluence_fairseq")  # --user-dir: the checkout's package
    for word in argv:
        if word.endswith((".npy", ".pt")) and not word.startswith("-"):
            (tmp_path / word).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / word).touch()

    try:
        if tool in FAIRSEQ_PARSERS:
            parser = getattr(options, FAIRSEQ_PARSERS[tool])(**({"default_task": "language_modeling"}
                                                                 if tool == "fairseq-eval-lm" else {}))
            options.parse_args_and_arch(parser, argv)
        else:
            module = importlib.import_module(tool)
            module.build_parser().parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"{doc}: `{tool} {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()[-500:]} "
                    f"({stop.code})")


def _readme_tour():
    return [(tool, argv) for tool, argv in documented_commands(H.REPO / "README.md") if tool.startswith("fairseq")]


SMALL = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
         "--decoder-attention-heads", "2"]
LM_SMALL = ["--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "2"]
TINY_RUN = ["--max-update", "3", "--max-tokens", "512", "--cpu", "--num-workers", "0", "--no-epoch-checkpoints",
            "--warmup-updates", "1"]


def test_readme_tour_runs_as_written_and_loses_nothing(translation_bin, lm_bin, tmp_path):
    tour = _readme_tour()
    assert [t for t, _ in tour] == ["fairseq-train", "fairseq-generate", "fairseq-interactive", "fairseq-train",
                                    "fairseq-eval-lm"]
    # the names the README uses, in a scratch directory; the plugin is the checkout's
    os.symlink(translation_bin, tmp_path / "data-bin")
    os.symlink(lm_bin, tmp_path / "lm-bin")
    os.symlink(H.REPO / "fluence_fairseq", tmp_path / "fluence_fairseq")
    test_sentences = len((translation_bin.parent / "raw" / "test.in").read_text().splitlines()) \
        if (translation_bin.parent / "raw").exists() else 16
    outputs = []
    for tool, argv in tour:
        if tool == "fairseq-train":
            extra = (LM_SMALL if "language_modeling" in argv else SMALL) + TINY_RUN
        else:
            extra = ["--cpu", "--num-workers", "0"]
        module = {"fairseq-train": "train", "fairseq-generate": "generate", "fairseq-interactive": "interactive",
                  "fairseq-eval-lm": "eval_lm"}[tool]
        stdin = "a b c d e\nj i h g\nc c a\n" if tool == "fairseq-interactive" else None
        outputs.append(H.run_fairseq(module, [*argv, *extra], cwd=tmp_path, input=stdin))
    generate, interactive, evaluation = outputs[1], outputs[2], outputs[4]
    ids = sorted(int(line.split("\t")[0][2:]) for line in generate.splitlines() if line.startswith("H-"))
    assert ids == list(range(test_sentences)), f"generate translated {len(ids)} of {test_sentences}"
    assert sum(line.startswith("H-") for line in interactive.splitlines()) == 3
    scored = int(re.search(r"Evaluated ([0-9,]+) tokens", evaluation).group(1).replace(",", ""))
    from fairseq.data import data_utils

    test = data_utils.load_indexed_dataset(str(lm_bin / "test"), None)
    assert scored == int(test.sizes.sum())  # every token of the split


# Each docs page's shell block is a workflow: its commands run in order, in one scratch directory, as written. Train
# lines get smaller widths (never fewer layers: later steps index them), a few updates and, where the page leaves
# the rest of a training command to the reader (`...`), an optimizer. A page that starts from "a trained
# checkpoint" gets one first, made by the command its later steps restore.
TRANSLATION_WIDTHS = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                      "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                      "--decoder-attention-heads", "2"]
LM_WIDTHS = ["--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2"]
FEW_UPDATES = ["--max-update", "3", "--cpu", "--num-workers", "0", "--no-epoch-checkpoints", "--warmup-updates", "1"]
WORKFLOWS = {
    "attention_pruning.md": [("fairseq-train", ["data-bin", "--user-dir", "fluence_fairseq", "--arch",
                                                "fluence_transformer_small", "--criterion",
                                                "label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "5e-4"])],
    "efficient_attention.md": [],
    "layerdrop.md": [],
    "long_context.md": [],
    "sparse_attention.md": [],
}


def _completed(tool, argv):
    """The documented command with what a tiny run needs appended (argparse keeps the last value of a flag)."""
    if tool == "fairseq-train":
        lm = "--task" in argv and argv[argv.index("--task") + 1] != "translation"
        extra = (LM_WIDTHS if lm else TRANSLATION_WIDTHS) + FEW_UPDATES
        if "--batch-size" not in argv:
            extra += ["--max-tokens", "512"]
        if "--optimizer" not in argv:
            extra += ["--optimizer", "adam", "--lr", "5e-4"]
        return argv + extra
    if tool.startswith("fairseq-"):
        return argv + ["--cpu", "--num-workers", "0"]
    return argv


#: the quick pages run in the default suite, the rest (20-30 s each) with -m slow
QUICK_PAGES = {"long_context.md", "sparse_attention.md"}


@pytest.mark.parametrize("page", [p if p in QUICK_PAGES else pytest.param(p, marks=pytest.mark.slow)
                                  for p in sorted(WORKFLOWS)])
def test_docs_page_workflow_runs_as_written(page, translation_bin, lm_bin, tmp_path):
    import subprocess
    import sys

    steps = WORKFLOWS[page] + documented_commands(H.REPO / "docs" / page, templates=True)
    assert len(steps) > len(WORKFLOWS[page])
    os.symlink(translation_bin, tmp_path / "data-bin")
    os.symlink(lm_bin, tmp_path / "lm-bin")
    os.symlink(H.REPO / "fluence_fairseq", tmp_path / "fluence_fairseq")
    test_sentences = len((translation_bin.parent / "raw" / "test.in").read_text().splitlines())
    for tool, argv in steps:
        argv = _completed(tool, argv)
        if tool.startswith("fairseq-"):
            module = {"fairseq-train": "train", "fairseq-generate": "generate", "fairseq-eval-lm": "eval_lm",
                      "fairseq-interactive": "interactive"}[tool]
            output = H.run_fairseq(module, argv, cwd=tmp_path)
        else:
            proc = subprocess.run([sys.executable, "-m", tool, *argv], cwd=tmp_path, env=H.clean_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
            assert proc.returncode == 0, f"{page}: `{tool} {' '.join(argv)}`\n{proc.stdout[-4000:]}"
            output = proc.stdout
        if tool == "fairseq-generate":
            ids = sorted(int(line.split("\t")[0][2:]) for line in output.splitlines() if line.startswith("H-"))
            assert ids == list(range(test_sentences)), f"{page}: generate translated {len(ids)} of {test_sentences}"
        if tool == "fairseq-eval-lm":
            from fairseq.data import data_utils

            scored = int(re.search(r"Evaluated ([0-9,]+) tokens", output).group(1).replace(",", ""))
            test = data_utils.load_indexed_dataset(str(lm_bin / "test"), None)  # (its sizes view its mmap)
            tokens = int(test.sizes.sum())
            # one stream, batch 1: every token but the first
            assert scored == tokens - ("fluence_lm_stream" in argv), f"{page}: eval-lm scored {scored} of {tokens}"
        for i, word in enumerate(argv):  # files a step says it writes exist
            if argv[i - 1] in ("-o", "--out") or (tool.endswith("prune_layers") and i == 1):
                assert (tmp_path / word).exists(), f"{page}: `{tool}` did not write {word}"
