"""circuit/: which heads feed which, screened cheaply and measured by path patching.

    >>> result = lens_attn.circuit(model)             # induction heads and what feeds them
    >>> result.to_dataframe()                         # sender, receiver, input, effect, stderr, ...
    >>> result.save("out/")                           # edges.csv, circuit.json

Modules: ``weights`` (the one weight accessor, both backends), ``activations`` (the one cached pass
per batch), ``receiver`` (a receiver head recomputed from its own q/k/v inputs), ``screen`` (first
order, every edge), ``paths`` (exact path patching), ``faithfulness``, ``result``, ``find``
(``circuit()``, the stages in order).

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

import sys
import types

from lens_attn.circuit.find import circuit
from lens_attn.circuit.result import CircuitResult, Edge, Faithfulness

__all__ = ["circuit", "CircuitResult", "Edge", "Faithfulness"]


class _CallableModule(types.ModuleType):
    """``lens_attn.circuit`` is this subpackage *and* the function ``circuit``: importing a
    submodule binds the package to the name ``circuit`` on ``lens_attn``, so the package itself
    forwards calls to :func:`lens_attn.circuit.find.circuit`."""

    def __call__(self, model, *args, **kwargs) -> CircuitResult:
        return circuit(model, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
