"""circuits/: which heads feed which, screened cheaply and measured by path patching.

    >>> result = lens_attn.circuit(model, ["L1H3"], top_k=4, top_logits=2)   # what feeds L1H3
    >>> list(result.to_dataframe().columns)[:6]
    ['sender', 'receiver', 'input', 'effect', 'stderr', 'method']
    >>> sorted(p.name for p in result.save(tmp_path).iterdir())
    ['circuit.json', 'edges.csv']

``lens_attn.circuit`` is :func:`lens_attn.circuits.find.circuit` (the subpackage is plural so that
the exported name stays a function). Modules: ``weights`` (the one weight accessor, both backends),
``activations`` (the one cached forward pass per batch), ``receiver`` (a receiver head recomputed
from its own q/k/v inputs), ``screen`` (first order, every edge), ``paths`` (exact path patching),
``faithfulness``, ``result``, ``find`` (``circuit()``, the stages in order).

GQA, what is and isn't separable. Query heads sharing a key/value head share ``W_K``/``W_V`` but
read their own copy of the input here: the path ``sender -> L5H1.k`` changes the keys only as
L5H1 computes them, so the other query heads of L5H1's group keep their clean keys (TransformerLens's
``hook_k`` / ``hook_k_input`` are per key/value head and would change the whole group). That is a
counterfactual the model cannot produce by itself (its keys are computed once per group), but it is
exactly one edge. What is not separable: a *sender*'s contribution per key/value head (a sender
writes one output, ``z @ W_O``, read by every receiver), and, inside the sender, the query heads of
one group share values, so cutting one sender query head still uses its group's clean values for
the others.
"""

from lens_attn.circuits.find import circuit
from lens_attn.circuits.result import CircuitResult, Edge, Faithfulness

__all__ = ["circuit", "CircuitResult", "Edge", "Faithfulness"]
