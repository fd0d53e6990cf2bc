"""``fluence-sample``: importance sampling of a binarised split (see :mod:`fluence_fairseq.sampling`).

    fluence-sample DATA --path CKPT --split train --out-split train30 --size 0.3 --clusters 100 --strategy per-cluster
"""
import argparse
import logging
import sys

import torch

from .. import sampling
from ..sampling import STRATEGIES, sample_split


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fluence-sample",
                                description=sampling.__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="fairseq-preprocess output directory (the new split is written here)")
    p.add_argument("--path", default=None, help="trained fairseq checkpoint whose encoder (or LM decoder) embeds")
    p.add_argument("--embeddings", default=None, help="precomputed (n, D) embeddings .npy instead of --path")
    p.add_argument("--save-embeddings", default=None, help="also save the computed embeddings as this .npy")
    p.add_argument("--split", default="train", help="split to sample from")
    p.add_argument("--out-split", required=True, help="name of the new split, e.g. train30")
    p.add_argument("--size", required=True, help="fraction in (0, 1] (e.g. 0.3) or count (e.g. 5000)")
    p.add_argument("--clusters", type=int, default=100, help="k-means clusters (1 <= k <= examples)")
    p.add_argument("--strategy", default="per-cluster", choices=STRATEGIES)
    p.add_argument("--seed", type=int, default=1, help="k-means, diverse order and random sample seed")
    p.add_argument("--source-lang", default=None)
    p.add_argument("--target-lang", default=None)
    p.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per embedding batch")
    p.add_argument("--batch-size", type=int, default=256, help="sentences per embedding batch")
    p.add_argument("--n-init", type=int, default=3, help="k-means restarts")
    p.add_argument("--kmeans", default="auto", choices=("auto", "kmeans", "minibatch"),
                   help="auto: MiniBatchKMeans above --minibatch-above examples, else KMeans")
    p.add_argument("--minibatch-above", type=int, default=100_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-split")
    p.add_argument("--no-progress-bar", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        sample_split(args.data, args.out_split, args.size, args.clusters, args.strategy, path=args.path,
                     embeddings=args.embeddings, split=args.split, seed=args.seed, source_lang=args.source_lang,
                     target_lang=args.target_lang, max_tokens=args.max_tokens, max_sentences=args.batch_size,
                     device=args.device, progress=not args.no_progress_bar, overwrite=args.overwrite,
                     save_embeddings=args.save_embeddings, n_init=args.n_init, algorithm=args.kmeans,
                     minibatch_above=args.minibatch_above)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        p.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
