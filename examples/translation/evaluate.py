"""Score fairseq-generate output with sacrebleu against the raw references, next to a copy-the-source floor.

    python examples/translation/evaluate.py --generate WORK/generate-test.txt --src WORK/raw/test.en \
        --ref WORK/raw/test.es [--spans WORK/spans.txt --train-seconds 540 --results WORK/results.md]

Hypotheses are the detokenised ``D-<id>`` lines of ``fairseq-generate --remove-bpe sentencepiece``, put back in
corpus order. The copy floor scores the English source itself as the "Spanish translation": names, numbers
and punctuation overlap, so it is not zero, and a model has to beat it to have learned anything.
"""
import argparse
import sys


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def read_hypotheses(path, n):
    hyps = {}
    for line in read_lines(path):
        if line.startswith("D-"):
            tag, _score, *text = line.split("\t")
            hyps[int(tag[2:])] = text[0] if text else ""
    missing = [i for i in range(n) if i not in hyps]
    if missing:
        sys.exit(f"{path}: no hypothesis for {len(missing)} of {n} sentences (first missing id {missing[0]})")
    return [hyps[i] for i in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generate", required=True, help="fairseq-generate output")
    p.add_argument("--src", required=True, help="raw source sentences (the copy floor)")
    p.add_argument("--ref", required=True, help="raw reference translations")
    p.add_argument("--hyp-out", default=None, help="write the detokenised hypotheses here, one per line")
    p.add_argument("--results", default=None, help="write a markdown summary here")
    p.add_argument("--spans", default=None, help="span table printed by fluence-plot spans, for the summary")
    p.add_argument("--train-seconds", type=float, default=None)
    p.add_argument("--total-seconds", type=float, default=None, help="wall time so far (prep + train + generate)")
    p.add_argument("--command", default=None, help="training command, for the summary")
    p.add_argument("--examples", type=int, default=3, help="example translations in the summary")
    args = p.parse_args(argv)

    import sacrebleu

    src, ref = read_lines(args.src), read_lines(args.ref)
    if len(src) != len(ref):
        sys.exit(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}")
    hyp = read_hypotheses(args.generate, len(ref))
    if args.hyp_out:
        with open(args.hyp_out, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyp)

    bleu = sacrebleu.metrics.BLEU()
    model = bleu.corpus_score(hyp, [ref])
    signature = str(bleu.get_signature())
    copy = sacrebleu.metrics.BLEU().corpus_score(src, [ref])
    chrf = sacrebleu.metrics.CHRF().corpus_score(hyp, [ref])
    copy_chrf = sacrebleu.metrics.CHRF().corpus_score(src, [ref])

    print(f"test BLEU, model            : {model.score:5.2f}   ({model})")
    print(f"test BLEU, copy the source  : {copy.score:5.2f}   ({copy})")
    print(f"test chrF, model / copy     : {chrf.score:5.2f} / {copy_chrf.score:5.2f}")
    print(f"sacrebleu signature: {signature}")

    if args.results:
        out = ["# Bible en->es with adaptive attention span: results", ""]
        out += ["| | BLEU | chrF |", "|---|---|---|",
                f"| model (beam 5) | {model.score:.2f} | {chrf.score:.2f} |",
                f"| copy the English source | {copy.score:.2f} | {copy_chrf.score:.2f} |", ""]
        out += [f"- BLEU details: `{model}`", f"- sacrebleu signature: `{signature}`",
                f"- test set: {len(ref)} verses"]
        if args.train_seconds is not None:
            out.append(f"- training wall time: {args.train_seconds:.0f} s")
        if args.total_seconds is not None:
            out.append(f"- wall time so far (prepare + train + generate + score): {args.total_seconds:.0f} s")
        if args.command:
            out += ["", "Training command:", "", "```", args.command.strip(), "```"]
        if args.spans:
            out += ["", "Learned spans (from `fluence-plot spans`):", "", "```", "\n".join(read_lines(args.spans)).strip(),
                    "```"]
        if args.examples:
            out += ["", "Examples (source / reference / model):", ""]
            for i in range(min(args.examples, len(ref))):
                out += [f"- EN: {src[i]}", f"  - REF: {ref[i]}", f"  - MT: {hyp[i]}"]
        with open(args.results, "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
