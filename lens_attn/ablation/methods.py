"""Knock out attention heads: the methods, and one ablation as a context manager or hooks.

    >>> tokens = model.to_tokens("The cat sat on the mat. The cat sat on the mat.")
    >>> with lens_attn.ablate(model, ["L1H3", (2, 0)], method="zero"):
    ...     ablated = model(tokens)
    >>> hooked = model.run_with_hooks(tokens, fwd_hooks=list(lens_attn.ablate(model, ["L1H3", (2, 0)])))
    >>> bool(torch.equal(ablated, hooked)), bool(torch.equal(ablated, model(tokens)))
    (True, False)

Many ablations at once, each measured with a metric: ``lens_attn.ablation.sweep.ablation_sweep``.

Methods (``AblationMethod``), each applied to the chosen query heads only:

=============  ==============================  ===================================================
method         hook point                      what the head does instead
=============  ==============================  ===================================================
``zero``       ``hook_z``                      outputs 0 (``b_O`` is zero in Llama, so the head
                                               contributes nothing)
``mean``       ``hook_z``                      outputs its mean over the ``reference`` prompts at
                                               the same position (padding-aware mean)
``resample``   ``hook_z``                      outputs what it output on a reference prompt drawn
                                               with a seeded generator (the same draw for every
                                               ablation in one call)
``bos``        ``hook_pattern``                attends only to ``key_pos`` 0 (BOS, as prompts are
                                               right-padded with BOS first)
``uniform``    ``hook_attn_scores``            attends uniformly to every visible key: scores of
                                               the unmasked (causal, real) keys are set to 0 before
                                               the softmax, so the pattern is ``1 / n_visible``
``patch``      ``hook_z``                      activation patching: outputs what it output on the
                                               ``reference`` prompt *of the same row* (input row
                                               ``i`` reads reference row ``i``; the two must have
                                               the same shape), as TransformerLens's
                                               ``patching.get_act_patch_attn_head_out_all_pos``
=============  ==============================  ===================================================

For ``patch`` the input is the corrupted run and ``reference`` the clean one (or the other way
round, for denoising vs noising). Patching per position is :mod:`lens_attn.ablation.patching`.

``hook_z`` ``[batch, pos, head_index, d_head]``, ``hook_pattern`` and ``hook_attn_scores``
``[batch, head_index, query_pos, key_pos]`` are per *query* head in TransformerLens, also under
grouped-query attention (keys and values are ``repeat_interleave``-d to the query heads before the
pattern), so ablating one query head leaves the heads that share its key/value head untouched. To
knock out a whole key/value group, pass ``groups=[(layer, kv_head)]`` or ``kv_group=True`` (every
given head expands to the query heads reading its key/value head ``h // (n_heads // n_kv_heads)``).
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_attn.errors import InputError
from lens_attn.heads import Head, head_label, resolve_heads
from lens_attn.probes import Probe, as_probes, check_context, pad, pad_token_id

AblationMethod = Literal["zero", "mean", "resample", "bos", "uniform", "patch"]
METHODS: tuple[str, ...] = get_args(AblationMethod)
_SITE = {"zero": "z", "mean": "z", "resample": "z", "bos": "pattern", "uniform": "attn_scores",
         "patch": "z"}  # fmt: skip
REFERENCE_METHODS = ("mean", "resample", "patch")  # need reference prompts


def check_method(method: str, valid: Sequence[str] = METHODS) -> str:
    if method not in valid:
        raise ValueError(f"unknown ablation method {method!r}; valid: {', '.join(valid)}")
    return method


# ------------------------------------------------------------------------------------------- heads


# ---------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """What ``mean`` and ``resample`` replace a head's output with, from reference prompts.

    ``mean[layer]`` is ``hook_z`` averaged over the prompts that have a real token at each position;
    ``z[layer]`` keeps every prompt's ``hook_z`` (only for ``resample`` and ``patch``; empty
    otherwise).
    """

    mask: Bool[Tensor, "ref pos"]
    mean: dict[int, Float[Tensor, "pos head_index d_head"]]
    z: dict[int, Float[Tensor, "ref pos head_index d_head"]] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def build(
        cls, model, reference, layers: Sequence[int], *, keep_z: bool, batch_size: int = 16
    ) -> "Reference":
        probes = as_probes(model, reference)
        check_context(model, probes)
        tokens, mask = pad(probes, pad_id=pad_token_id(model))
        device = model.cfg.device
        names = {get_act_name("z", layer): layer for layer in layers}
        sums: dict[int, Tensor] = {}
        parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for start in range(0, len(probes), batch_size):
            chunk_mask = mask[start : start + batch_size].to(device)
            _, cache = model.run_with_cache(
                tokens[start : start + batch_size].to(device),
                attention_mask=chunk_mask.long(),
                names_filter=lambda name: name in names,
                return_type=None,
            )
            for name, layer in names.items():
                z = cache[name].detach().float()  # [batch, pos, head_index, d_head], layer's device
                weight = chunk_mask.to(z.device).float()[:, :, None, None]  # padding counts 0
                sums[layer] = sums.get(layer, 0) + (z * weight).sum(0)
                if keep_z:
                    parts[layer].append(z)
        count = (
            mask.to(device).float().sum(0)[:, None, None]
        )  # [pos, 1, 1]; >= 1: the longest prompt is real everywhere
        mean = {layer: total / count.to(total.device) for layer, total in sums.items()}
        z = {layer: torch.cat(chunks) for layer, chunks in parts.items()} if keep_z else {}
        return cls(mask.to(device), mean, z)

    def _check_length(self, n_pos: int) -> None:
        if n_pos > self.mask.shape[1]:
            raise ValueError(
                f"the input has {n_pos} positions but the reference prompts only "
                f"{self.mask.shape[1]}; "
                "give reference prompts at least as long as the input"
            )

    def select(self, idx: Tensor) -> "Reference":
        """Reference prompts ``idx`` only (``patch``: a chunk of input rows reads the same rows)."""
        z = {layer: z[idx.to(z.device)] for layer, z in self.z.items()}
        return Reference(self.mask[idx.to(self.mask.device)], self.mean, z)

    def paired_z(
        self, layer: int, n_pos: int, rows: int
    ) -> Float[Tensor, "rows pos head_index d_head"]:
        """``hook_z`` of reference rows ``0..rows-1`` at positions ``0..n_pos-1`` (``patch``)."""
        z = self.z[layer]
        if z.shape[0] != rows or n_pos > z.shape[1]:
            raise ValueError(
                f"method='patch' runs input row i with the head outputs of reference row i: the "
                f"input has {rows} prompts of {n_pos} positions, the reference {z.shape[0]} of "
                f"{z.shape[1]}; give reference prompts of the same shape as the input"
            )
        return z[:, :n_pos]

    def mean_z(self, layer: int, n_pos: int) -> Float[Tensor, "pos head_index d_head"]:
        self._check_length(n_pos)
        return self.mean[layer][:n_pos]

    def sample_z(
        self, layer: int, n_pos: int, rows: int, seed: int
    ) -> Float[Tensor, "rows pos head_index d_head"]:
        self._check_length(n_pos)
        # reference prompts with at least n_pos real tokens
        eligible = self.mask[:, n_pos - 1].nonzero()[:, 0]
        if len(eligible) == 0:
            raise ValueError(
                f"no reference prompt has {n_pos} real tokens; give longer reference prompts"
            )
        g = torch.Generator().manual_seed(seed)
        pick = eligible[torch.randint(len(eligible), (rows,), generator=g).to(eligible.device)]
        z = self.z[layer]
        return z[pick.to(z.device), :n_pos]


# -------------------------------------------------------------------------------------------- hooks


def _replacement(
    method: str, layer: int, act: Tensor, base_batch: int, reference, seed: int
) -> Tensor:
    """Every head of ``act`` under ``method`` (the caller keeps the heads it doesn't ablate)."""
    if method == "zero":
        return torch.zeros_like(act)
    if method == "mean":  # act: [rows, pos, head_index, d_head]
        return reference.mean_z(layer, act.shape[1]).to(act.device, act.dtype).expand_as(act)
    if method == "resample":
        z = reference.sample_z(layer, act.shape[1], base_batch, seed).to(act.device, act.dtype)
        return z.repeat(act.shape[0] // base_batch, 1, 1, 1)
    if (
        method == "patch"
    ):  # act: [variants * rows, pos, head_index, d_head]; row i <- reference row i
        z = reference.paired_z(layer, act.shape[1], base_batch).to(act.device, act.dtype)
        return z.repeat(act.shape[0] // base_batch, 1, 1, 1)
    if method == "bos":  # act: [rows, head_index, query_pos, key_pos]
        one_hot = torch.zeros_like(act)
        one_hot[..., 0] = 1.0
        return one_hot
    # uniform: act are scores [rows, head_index, query_pos, key_pos]; masked keys hold -inf
    visible = act > torch.finfo(act.dtype).min / 2
    return torch.where(visible, torch.zeros_like(act), act)


def ablation_hook(
    method: str, layer: int, row_mask: Bool[Tensor, "rows head_index"], base_batch, reference, seed
):
    """A hook replacing the heads where ``row_mask`` is True (a one-row mask covers every row)."""
    site = _SITE[method]

    def hook(act: Tensor, hook) -> Tensor:
        rows = base_batch if base_batch is not None else act.shape[0]
        repl = _replacement(method, layer, act, rows, reference, seed)
        m = row_mask.to(act.device)
        m = m[:, None, :, None] if site == "z" else m[:, :, None, None]
        return torch.where(m, repl, act)  # a new tensor: the activation is never written in place

    return hook


def ablation_hook_name(method: str, layer: int) -> str:
    return get_act_name(_SITE[method], layer)


class Ablation:
    """Forward hooks that ablate some heads; a context manager and an iterable of ``(name, fn)``.

    ``with ablation: ...`` attaches the hooks (through ``model.hooks``) and removes them on exit,
    also when the body raises. ``model.run_with_hooks(tokens, fwd_hooks=list(ablation))`` uses them
    for one run.
    """

    def __init__(
        self, model, heads: list[Head], method: str, fwd_hooks: list[tuple[str, Callable]]
    ):
        self.model = model
        self.heads = heads
        self.method = method
        self.fwd_hooks = fwd_hooks
        self._context = None

    def __iter__(self) -> Iterator[tuple[str, Callable]]:
        return iter(self.fwd_hooks)

    def __len__(self) -> int:
        return len(self.fwd_hooks)

    def __repr__(self) -> str:
        heads = ", ".join(head_label(*h) for h in self.heads)
        return f"Ablation(method={self.method!r}, heads=[{heads}])"

    def __enter__(self) -> "Ablation":
        if self._context is not None:
            raise RuntimeError("this ablation is already active; leave its `with` block first")
        context = self.model.hooks(fwd_hooks=self.fwd_hooks)
        context.__enter__()
        self._context = context
        return self

    def __exit__(self, *exc_info) -> None:
        context, self._context = self._context, None
        context.__exit__(*exc_info)  # model.hooks removes its hooks in a finally


def ablate(
    model,
    heads,
    *,
    method: AblationMethod = "zero",
    reference: "list[str] | list[Probe] | Tensor | None" = None,
    kv_group: bool = False,
    groups: "Sequence[tuple[int, int] | str] | None" = None,
    seed: int = 0,
    allow_empty: bool = False,
) -> Ablation:
    """Knock out ``heads`` with ``method``; use as ``with ablate(...):`` or ``fwd_hooks=list(...)``.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        heads: a head or a list of heads, each ``(layer, head)``, ``"L1H3"``, ``(layer, head,
            score)`` as ``HeadScores.top`` returns, or ``"L1"`` for every head of layer 1. Empty
            (and no ``groups``): ``InputError``, unless ``allow_empty``.
        method: one of ``zero, mean, resample, bos, uniform, patch`` (module docstring).
        reference: prompts, probes or a ``[batch, pos]`` token tensor whose ``hook_z`` the ``mean``,
            ``resample`` and ``patch`` methods use; required for them, ignored otherwise. Run
            once, now. For ``patch``, of the same shape as every input the ablation runs on.
        kv_group: expand every head to all query heads that share its key/value head.
        groups: whole key/value groups to ablate as well, ``(layer, kv_head)`` or ``"L1KV0"``.
        seed: seed of the ``resample`` draw.
        allow_empty: accept an empty selection as a no-op (no hooks), e.g. for a baseline.
    """
    check_method(method)
    chosen = resolve_heads(model, heads, kv_group=kv_group, groups=groups)
    if not chosen and not allow_empty:
        raise InputError(
            f"ablate() got no heads to ablate (heads={heads!r}); give heads as (layer, head), "
            "'L1H3' or 'L1', or pass allow_empty=True for a deliberate no-op"
        )
    layers = sorted({layer for layer, _ in chosen})
    ref = build_reference(model, method, reference, layers)
    hooks = []
    for layer in layers:
        row_mask = torch.zeros(1, model.cfg.n_heads, dtype=torch.bool)
        row_mask[0, [h for ly, h in chosen if ly == layer]] = True
        hooks.append(
            (
                ablation_hook_name(method, layer),
                ablation_hook(method, layer, row_mask, None, ref, seed),
            )
        )
    return Ablation(model, chosen, method, hooks)


def build_reference(model, method: str, reference, layers: Sequence[int]) -> "Reference | None":
    if method not in REFERENCE_METHODS:
        return None
    if reference is None:
        raise ValueError(
            f"method={method!r} needs reference data: pass reference=<prompts, probes or tokens> "
            "(for example the same prompts you measure on)"
        )
    if not layers:
        return None
    return Reference.build(model, reference, layers, keep_z=method != "mean")


# ------------------------------------------------------------------------------------------- result


# ----------------------------------------------------------------------------------- sweep inputs
