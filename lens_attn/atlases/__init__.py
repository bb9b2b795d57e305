"""The head atlas: what every head does across a corpus (``lens_attn.atlas(model, texts)``).

    >>> texts = ["The cat sat on the mat. The cat sat on the mat."]
    >>> head_atlas = lens_attn.atlas(model, texts, k=5, progress=False)   # one streaming pass
    >>> head_atlas.top_examples("L1H5", 2).columns[:3].tolist()
    ['doc', 'query_pos', 'activation']
    >>> len(head_atlas.to_dataframe())                                    # one row per head
    32

Modules: ``corpus`` (reading a corpus, windows, the default corpus), ``accumulators`` (exact top-k,
hash-priority reservoirs, metric sums), ``reduce`` (one batch: each layer's work inside its hooks,
then one merge), ``runner`` (the streaming pass, ``atlas``), ``circuits`` (OV and QK tables from the weights),
``result`` (``HeadAtlas``). The page is ``lens_attn.render.atlas``.

The package is ``atlases`` (like ``lens_attn.circuits``) so that the function users call,
``lens_attn.atlas``, is never shadowed by a subpackage of the same name.
"""

from lens_attn.atlases.result import HeadAtlas
from lens_attn.atlases.runner import atlas

__all__ = ["HeadAtlas", "atlas"]
