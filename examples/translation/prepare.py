"""Prepare the bundled Bible en->es corpus for fairseq: raw text, a joint sentencepiece model, encoded splits.

    python examples/translation/prepare.py --data examples/translation/data --work examples/translation/work

Writes WORK/raw/{train,valid,test}.{en,es} (plain text, one verse per line), WORK/spm.model and
WORK/spm/{train,valid,test}.{en,es} (space-separated sentencepiece pieces), ready for fairseq-preprocess.
Steps whose outputs exist are skipped.
"""
import argparse
import gzip
import os
import sys

SPLITS = ("train", "valid", "test")
LANGS = ("en", "es")


def read_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with {train,valid,test}.{en,es}.gz")
    p.add_argument("--work", required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=6000, help="joint sentencepiece vocabulary (default 6000)")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import sentencepiece as spm

    raw = os.path.join(args.work, "raw")
    enc = os.path.join(args.work, "spm")
    os.makedirs(raw, exist_ok=True)
    os.makedirs(enc, exist_ok=True)

    # 1. raw text (whitespace normalised; the two sides must stay line-aligned)
    for split in SPLITS:
        sides = {lang: read_gz(os.path.join(args.data, f"{split}.{lang}.gz")) for lang in LANGS}
        if len(sides["en"]) != len(sides["es"]):
            sys.exit(f"{split}: {len(sides['en'])} English lines but {len(sides['es'])} Spanish lines")
        for lang in LANGS:
            out = os.path.join(raw, f"{split}.{lang}")
            if not os.path.exists(out):
                write_lines(out, [" ".join(line.split()) for line in sides[lang]])
        print(f"{split}: {len(sides['en'])} verse pairs")

    # 2. one sentencepiece model for both languages (fairseq-preprocess --joined-dictionary then shares it)
    prefix = os.path.join(args.work, "spm")
    model = prefix + ".model"
    if not os.path.exists(model):
        spm.SentencePieceTrainer.train(
            input=[os.path.join(raw, f"train.{lang}") for lang in LANGS],
            model_prefix=prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=1.0,  # keep every accented letter: the Spanish side needs them
            num_threads=args.threads,
            # fairseq adds its own <s>, <pad>, </s>, <unk>; sentencepiece's are not used in the encoded text
            bos_id=-1, eos_id=-1, unk_id=0,
            minloglevel=2,
        )
        print(f"trained {model} ({args.model_type}, {args.vocab_size} pieces)")

    # 3. encode every split
    sp = spm.SentencePieceProcessor(model_file=model)
    for split in SPLITS:
        for lang in LANGS:
            out = os.path.join(enc, f"{split}.{lang}")
            if os.path.exists(out):
                continue
            with open(os.path.join(raw, f"{split}.{lang}"), encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
            write_lines(out, [" ".join(pieces) for pieces in sp.encode(lines, out_type=str)])
    lengths = []
    with open(os.path.join(enc, "train.en"), encoding="utf-8") as f:
        lengths = sorted(len(line.split()) for line in f)
    print(f"train.en pieces per verse: mean {sum(lengths) / len(lengths):.1f}, "
          f"median {lengths[len(lengths) // 2]}, 95% {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]}")


if __name__ == "__main__":
    main()
