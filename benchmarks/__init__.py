"""Benchmarks of fluence_fairseq (not installed with the package; run from the repository root).

* ``python -m benchmarks.attention``: one attention's training and decoding step against fairseq's
  ``MultiheadAttention``, SDPA and a projections-only baseline (``make bench``);
* ``python -m benchmarks.models``: whole-model training throughput of the sparse attentions (``make bench-sparse``);
* ``python -m benchmarks.pruning``: the block-sparse pruned-attention kernel against dense SDPA
  (``make bench-pruning``).

Results are written to ``benchmarks/results/``; ``docs/benchmarks.md`` shows them with the commands.
"""
