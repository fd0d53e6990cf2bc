"""A synthetic sentence classification data set with a spurious token, for HEX (``fluence_fairseq.hex``).

Each sentence is random filler words with one *subject* word (``s0``..``s2``) and one *object* word (``o0``..``o2``)
at random positions, and one *cue* token (``cue0``/``cue1``) at a random position.

* The real rule: label 1 if the subject word comes before the object word, else 0. It depends on word **order**
  only: every sentence has the same kinds of words whatever its label, so a bag of words carries no information
  about it (which is what HEX assumes of its naive model: it must not be able to see the semantics).
* The spurious cue: ``cue<label>`` in a fraction ``spurious`` (default 0.95) of the training sentences, the other
  cue otherwise; in valid/test the cue is drawn independently of the label (50%). A model that leans on the cue
  scores ~95% in training and ~50% on test.

Writes ``raw/<split>.input0`` and ``raw/<split>.label`` and binarises them like fairseq's RoBERTa GLUE recipe
(``fairseq-preprocess --only-source`` into ``input0/`` and ``label/``, with fixed dictionaries via ``--srcdict``, so
class ids and token ids do not depend on the sample), ready for ``--task sentence_prediction --num-classes 2``.

    python examples/classification/spurious_data.py OUT_DIR [--n-train 2000 --seed 1 --spurious 0.95]
"""
import argparse
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

SUBJECTS = ("s0", "s1", "s2")
OBJECTS = ("o0", "o1", "o2")
CUES = ("cue0", "cue1")
LABELS = ("0", "1")


def fillers(n: int = 20) -> List[str]:
    return [f"w{i}" for i in range(n)]


def vocabulary(n_fillers: int = 20) -> List[str]:
    return fillers(n_fillers) + list(SUBJECTS) + list(OBJECTS) + list(CUES)


def make_sentence(rng: random.Random, label: int, cue: int, n_fillers: int = 20, min_len: int = 4,
                  max_len: int = 10) -> List[str]:
    """One sentence (list of words) whose subject/object order encodes ``label`` and which contains ``cue<cue>``."""
    words = [rng.choice(fillers(n_fillers)) for _ in range(rng.randint(min_len, max_len))]
    i, j = sorted(rng.sample(range(len(words) + 2), 2))  # two distinct positions in the final sentence
    first, second = (rng.choice(SUBJECTS), rng.choice(OBJECTS)) if label == 1 else (rng.choice(OBJECTS),
                                                                                    rng.choice(SUBJECTS))
    words.insert(i, first)
    words.insert(j, second)
    words.insert(rng.randint(0, len(words)), CUES[cue])
    return words


def make_split(n: int, spurious: float, seed: int, **kw) -> Tuple[List[List[str]], List[int]]:
    """``n`` balanced sentences and labels; ``spurious`` = P(cue == label) (0.5 = independent)."""
    if n < 1:
        raise ValueError(f"a split needs at least one sentence, got n={n}")
    if not 0.0 <= spurious <= 1.0:
        raise ValueError(f"spurious is a probability (P(cue == label)), got {spurious}")
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    sentences = []
    for y in labels:
        cue = y if rng.random() < spurious else 1 - y
        sentences.append(make_sentence(rng, y, cue, **kw))
    return sentences, labels


def subject_first(words: Sequence[str]) -> int:
    """The real rule, recomputed from a sentence (for checks)."""
    s = next(k for k, w in enumerate(words) if w in SUBJECTS)
    o = next(k for k, w in enumerate(words) if w in OBJECTS)
    return int(s < o)


def cue_of(words: Sequence[str]) -> int:
    return next(CUES.index(w) for w in words if w in CUES)


DEFAULT_SIZES = {"train": 2000, "valid": 500, "test": 1000}


def generate(out_dir: Path, sizes: Dict[str, int] = None, spurious: float = 0.95, seed: int = 1) -> Path:
    """Write ``out_dir/raw/<split>.{input0,label}`` (train with ``spurious``, valid/test with 0.5) and the fixed
    dictionaries ``out_dir/raw/dict.{input0,label}.txt``; return the raw folder."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    raw = Path(out_dir) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(sorted(sizes.items())):
        p = spurious if split == "train" else 0.5
        sentences, labels = make_split(n, p, seed * 1000 + k)
        (raw / f"{split}.input0").write_text("".join(" ".join(s) + "\n" for s in sentences))
        (raw / f"{split}.label").write_text("".join(f"{y}\n" for y in labels))
    (raw / "dict.input0.txt").write_text("".join(f"{w} 1\n" for w in vocabulary()))
    (raw / "dict.label.txt").write_text("".join(f"{y} 1\n" for y in LABELS))
    return raw


def binarize(raw: Path, dest: Path, python: str = sys.executable, splits=("train", "valid", "test")) -> Path:
    """``fairseq-preprocess --only-source`` for ``input0`` and ``label`` (the RoBERTa GLUE layout)."""
    for field in ("input0", "label"):
        cmd = [python, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict", str(raw / f"dict.{field}.txt"),
               "--destdir", str(Path(dest) / field), "--workers", "1"]
        for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
            if split in splits:
                cmd += [flag, str(raw / f"{split}.{field}")]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"fairseq-preprocess failed for {field}:\n$ {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return Path(dest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--n-valid", type=int, default=DEFAULT_SIZES["valid"])
    p.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"])
    p.add_argument("--spurious", type=float, default=0.95, help="P(cue == label) in train [0.95]")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    raw = generate(a.out_dir, {"train": a.n_train, "valid": a.n_valid, "test": a.n_test}, a.spurious, a.seed)
    print(binarize(raw, a.out_dir / "bin"))


if __name__ == "__main__":
    main()
