"""Pruning, in one place.

Data-informed attention pruning (Rugina et al. 2020), in the order of its workflow:

* :mod:`.collect`: average attention patterns of a model over data (run by the ``compute_attn_score`` task,
  :mod:`fluence_fairseq.tasks.compute_attn_score`, and the ``fluence-attn-score`` command);
* :mod:`.patterns`: the pattern files (``<type>.npy`` + ``<type>.json``) and their checks;
* :mod:`.policy`: which entries to prune (per layer, head or model; data-informed or random);
* :mod:`.masks`: the per-layer keep mask an attention applies (:class:`~.masks.GlobalAttentionMask`);
* :mod:`.flags`: the ``--attn-patterns-*``/``--attn-prune-*`` flags every fluence architecture offers.

Also :mod:`.weights` (magnitude, random and structured weight pruning, attention-head removal) and :mod:`.layers`
(keeping some layers of a LayerDrop checkpoint).

Nothing is imported here: the attention base imports :mod:`.masks`, and :mod:`.flags` imports the base.
"""
