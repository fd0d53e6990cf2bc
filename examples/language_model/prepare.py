"""Turn the bundled Shakespeare text into character tokens for fairseq-preprocess.

    python examples/language_model/prepare.py --data examples/language_model/data --work examples/language_model/work

Every character becomes one space-separated token; a space becomes SPACE (default U+2581 "▁", because the text
itself contains "_"); every line stays a line, so fairseq appends </s> to it and </s> plays the newline.
Hence one fairseq token = one character of the original text (newlines included) and the loss per token that
fairseq reports (in base 2) is bits per character. ``--decode`` maps such tokens back to text.
"""
import argparse
import gzip
import os
import sys

SPLITS = ("train", "valid", "test")
SPACE = "\u2581"


def encode_line(line: str, space: str = SPACE) -> str:
    return " ".join(space if c == " " else c for c in line)


def decode_line(tokens: str, space: str = SPACE) -> str:
    return "".join(" " if t == space else t for t in tokens.split())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="folder with {train,valid,test}.txt.gz")
    p.add_argument("--work", help="output folder: WORK/chars/{train,valid,test}.txt")
    p.add_argument("--space", default=SPACE, help="token standing for a space (default U+2581)")
    p.add_argument("--decode", action="store_true", help="read character tokens on stdin, write text on stdout")
    args = p.parse_args(argv)

    if args.decode:
        for line in sys.stdin:
            sys.stdout.write(decode_line(line, args.space) + "\n")
        return
    if not args.data or not args.work:
        p.error("--data and --work are required")

    out_dir = os.path.join(args.work, "chars")
    os.makedirs(out_dir, exist_ok=True)
    for split in SPLITS:
        with gzip.open(os.path.join(args.data, f"{split}.txt.gz"), "rt", encoding="utf-8") as f:
            text = f.read()
        if args.space in text:
            sys.exit(f"{split}: the text already contains the space symbol {args.space!r}; pick another --space")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last line, it does not start an empty one
        others = sorted({c for line in lines for c in line if c.isspace() and c != " "})
        if others:
            sys.exit(f"{split}: whitespace other than spaces and newlines ({others!r}) would be lost; normalise it")
        out = os.path.join(out_dir, f"{split}.txt")
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            for line in lines:
                f.write(encode_line(line, args.space) + "\n")
        os.replace(out + ".tmp", out)
        chars = sum(len(line) + 1 for line in lines)
        print(f"{split}: {len(lines)} lines, {chars} characters (newlines included)")


if __name__ == "__main__":
    main()
