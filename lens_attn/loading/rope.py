"""Rotary-embedding variants of Llama checkpoints: plain (Llama 2) and Llama 3.x's ``llama3`` scaling.

Llama 3.1+ configs carry ``rope_scaling`` (``rope_parameters`` in transformers 5) of type
``llama3``: the NTK-by-parts interpolation of Peng et al. 2023 ("YaRN", section 3.2) without its
attention scaling. Rotary frequencies whose wavelength is shorter than
``original_max_position_embeddings / high_freq_factor`` are kept, those longer than
``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, and the ones in
between are interpolated. TransformerLens's ``HookedTransformerConfig`` computes exactly this when
``use_NTK_by_parts_rope`` is set (its code is copied from transformers' ``_compute_llama3_parameters``);
:func:`hooked_rope_fields` maps one onto the other. Every other scaling type is refused.
"""

ROPE_TYPES = ("default", "llama3")
LLAMA3_FIELDS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def rope_type(rope) -> str | None:
    """The ``rope_type`` (or legacy ``type``) of a rope dict; ``None`` for no dict."""
    if rope is None:
        return None
    if not isinstance(rope, dict):
        return rope
    return rope.get("rope_type", rope.get("type", "default"))


def check_rope(rope, *, key: str, source: str) -> None:
    """Refuse a ``rope_scaling`` / ``rope_parameters`` value lens-attn would compute differently."""
    kind = rope_type(rope)
    if kind in (None, "default"):
        return
    if kind != "llama3":
        raise ValueError(
            f"{source}: {key} of type {kind!r} is not supported; valid: null, type 'default' "
            "(plain rotary embeddings as in Llama 2) or type 'llama3' (Llama 3.1+)"
        )
    missing = [name for name in LLAMA3_FIELDS if not isinstance(rope.get(name), int | float)]
    if missing:
        raise ValueError(
            f"{source}: {key} of type 'llama3' needs numbers for {', '.join(LLAMA3_FIELDS)}; "
            f"missing or not numeric: {', '.join(missing)}"
        )
    if not rope["high_freq_factor"] > rope["low_freq_factor"]:
        raise ValueError(
            f"{source}: {key} high_freq_factor {rope['high_freq_factor']} must be greater than "
            f"low_freq_factor {rope['low_freq_factor']}"
        )
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta", *LLAMA3_FIELDS})
    if extra:
        # e.g. attention_factor: transformers would scale attention by it; TransformerLens can't
        raise ValueError(
            f"{source}: {key} of type 'llama3' has fields {extra} that lens-attn does not "
            f"compute; valid: rope_type, rope_theta, {', '.join(LLAMA3_FIELDS)}"
        )


def hooked_rope_fields(rope_parameters: dict | None) -> dict:
    """``HookedTransformerConfig`` keyword arguments for a checked rope dict (empty for plain rope)."""
    rope = rope_parameters or {}
    if rope_type(rope) != "llama3":
        return {}
    return dict(
        use_NTK_by_parts_rope=True,
        NTK_by_parts_factor=float(rope["factor"]),
        NTK_by_parts_low_freq_factor=float(rope["low_freq_factor"]),
        NTK_by_parts_high_freq_factor=float(rope["high_freq_factor"]),
        NTK_original_ctx_len=int(rope["original_max_position_embeddings"]),
    )
