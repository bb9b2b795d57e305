"""TransformerLens 3.9 and 4.x side by side: the one module that knows which one is installed.

TransformerLens 4.0 removed ``HookedTransformer`` (and ``HookedTransformerConfig``, ``components``,
``loading_from_pretrained``, ``utils``); ``TransformerBridge`` is its only model there. Importing a
removed name from ``transformer_lens`` raises ImportError (not AttributeError, so ``hasattr`` and
``getattr(..., default)`` raise too). Everything in lens-attn that needs the hooked model imports
it from here:

    >>> from lens_attn.compat import HAS_HOOKED, HookedTransformer, is_hooked
    >>> is_hooked(model) == HAS_HOOKED == isinstance(model, HookedTransformer)  # load_model's default
    True

Hook names come from ``transformer_lens.utilities.get_act_name`` on both versions (3.9 has it too).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Literal


def _tl_version() -> tuple[int, int]:
    try:
        text = version("transformer-lens")
    except PackageNotFoundError:  # a source checkout on sys.path: ask the module
        import transformer_lens

        text = getattr(transformer_lens, "__version__", "0.0")
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


TL_VERSION: tuple[int, int] = _tl_version()
"""``(major, minor)`` of the installed TransformerLens, e.g. ``(3, 9)`` or ``(4, 3)``."""

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    HAS_HOOKED = True
except ImportError:  # TransformerLens >= 4
    HAS_HOOKED = False

    class _Removed:
        """Stands in for a class TransformerLens 4 removed: nothing is an instance of it."""

        def __init__(self, *args, **kwargs):
            raise ImportError(
                f"{type(self).__name__} does not exist in TransformerLens "
                f"{'.'.join(map(str, TL_VERSION))}; use load_model(..., backend='bridge') "
                "(a TransformerBridge), or install transformer-lens==3.9.0"
            )

    class HookedTransformer(_Removed):  # type: ignore[no-redef]
        """Placeholder: TransformerLens 4 has no HookedTransformer."""

    class HookedTransformerConfig(_Removed):  # type: ignore[no-redef]
        """Placeholder: TransformerLens 4 has no HookedTransformerConfig."""


DEFAULT_BACKEND: Literal["hooked", "bridge"] = "hooked" if HAS_HOOKED else "bridge"
"""What ``load_model`` builds when no backend is given: the bridge where there is nothing else."""

BRIDGE_STARTS_AT_LAYER = TL_VERSION >= (4, 0)
"""TransformerBridge supports ``forward(..., start_at_layer=)`` from 4.0 (3.9: NotImplementedError)."""


def is_hooked(model) -> bool:
    """Whether ``model`` is a ``HookedTransformer`` (never on TransformerLens 4)."""
    return HAS_HOOKED and isinstance(model, HookedTransformer)


def can_start_at_layer(model) -> bool:
    """Whether ``model.run_with_hooks(x, start_at_layer=l)`` runs from ``blocks.l.hook_resid_pre``."""
    if is_hooked(model):
        return True
    from transformer_lens.model_bridge import TransformerBridge

    return BRIDGE_STARTS_AT_LAYER and isinstance(model, TransformerBridge)


def architecture(cfg) -> str | None:
    """The HF architecture name: ``original_architecture`` (HookedTransformer), else ``architecture``
    (TransformerBridge, where ``original_architecture`` is None)."""
    return getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)


def check_backend_available(backend: str) -> None:
    """Refuse ``backend="hooked"`` where TransformerLens has no HookedTransformer."""
    if backend == "hooked" and not HAS_HOOKED:
        raise ValueError(
            f"backend='hooked' needs HookedTransformer, which TransformerLens "
            f"{'.'.join(map(str, TL_VERSION))} removed; use backend='bridge' (the default there) "
            "or install transformer-lens==3.9.0"
        )


class StopForward(Exception):
    """Raised by a hook to end a forward pass there: nothing after it is read
    (``run_until_stopped``)."""


def run_until_stopped(model, tokens, fwd_hooks=None, **kwargs) -> None:
    """``model.run_with_hooks(tokens, fwd_hooks=..., return_type=None, **kwargs)`` that ends
    quietly where a hook raises ``StopForward``: the rest of that layer, the later blocks and the
    final norm and unembedding never run (on a ``TransformerBridge`` ``stop_at_layer=n_layers``
    skips none of these: it stops before a block, and there is no block ``n_layers``).
    ``run_with_hooks`` removes the hooks on the way out either way.

    ``fwd_hooks=None`` runs the hooks attached already: a stream of batches attaches them once,
    ``with model.hooks(fwd_hooks=...):``, rather than once per batch (on a bridge each attach
    resolves every hook name anew)."""
    try:
        if fwd_hooks is None:
            model(tokens, return_type=None, **kwargs)
        else:
            model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type=None, **kwargs)
    except StopForward:
        pass
