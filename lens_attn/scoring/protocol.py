"""The protocol every head score follows, built-in or yours (registered in ``lens_attn.scoring.registry``).

An ``Analysis`` names the hook points it reads in each layer and reduces one batch of them to
*summable* per-head state. ``score_heads`` runs all requested analyses in one forward pass per batch:
each layer's activations are reduced inside that layer's hooks and then dropped, so memory never holds
more than one layer's activations. Because the state is sums and counts, batches (and processes) merge
exactly by adding.

Most scores are "the mean over prompts of a per-prompt ratio"; write those as a function that returns a
``PromptRatio`` and register it. A worked example, attention to punctuation::

    import torch
    from lens_attn import register_analysis
    from lens_attn.scoring.protocol import PromptRatio

    @register_analysis("punctuation", hooks=("pattern",))
    def punctuation(layer, acts, batch):
        pattern = acts["pattern"]                            # [batch, head_index, query_pos, key_pos]
        is_punct = torch.tensor([[t.strip() in {".", ",", ";", ":"} for t in batch.str_tokens(i)]
                                 for i in range(len(batch.tokens))], device=pattern.device)
        mass = (pattern * is_punct[:, None, None, :]).sum(-1)          # [batch, head_index, query_pos]
        rows = batch.query_mask.float()                                 # [batch, query_pos]
        return PromptRatio((mass * rows[:, None]).sum(-1), rows.sum(-1)[:, None])

    scores = lens_attn.score_heads(model, scores=["punctuation", "induction"])

``hooks`` are activation names for ``transformer_lens.get_act_name(name, layer)``: ``"pattern"``,
``"attn_scores"``, ``"q"``, ``"k"``, ``"v"``, ``"z"``, ``"result"``, ``"resid_pre"``, ``"resid_post"``,
``"attn_out"``, ``"mlp_out"`` ... A full per-layer hook name such as ``"attn.hook_z"`` works too.
``"result"`` needs ``model.set_use_attn_result(True)``; ``score_heads`` switches it on for the pass.
"""

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_attn.probes import Probe

Measure = Literal["mul", "abs"]
Normalize = Literal["target_rows", "all_rows"]


@dataclass
class Batch:
    """What an analysis sees of the batch being run: right-padded tokens and their masks."""

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]  # True on real tokens
    probes: list[Probe]
    model: object = field(repr=False)
    normalize: "Normalize" = "target_rows"
    scratch: dict = field(default_factory=dict, repr=False)  # per-batch values shared by analyses
    query_start: int = 0  # absolute position of the pattern's first row (chunked scoring)
    fused: tuple[str, ...] = ()  # the fused built-in scores of this pass (``scoring.fused``)
    # TransformerLens detect_head's flags: leave attention to key_pos 0 / to query_pos out
    exclude_bos: bool = False
    exclude_current_token: bool = False

    def query_rows(self, n_rows: int) -> slice:
        """The absolute query positions of a pattern block with ``n_rows`` rows."""
        return slice(self.query_start, self.query_start + n_rows)

    def excluded(self, n_rows: int, n_keys: int, device) -> Bool[Tensor, "rows key_pos"] | None:
        """Pattern entries the scores leave out (``exclude_bos``, ``exclude_current_token``)."""
        if not (self.exclude_bos or self.exclude_current_token):
            return None
        rows = torch.arange(self.query_start, self.query_start + n_rows, device=device)[:, None]
        keys = torch.arange(n_keys, device=device)[None, :]
        out = torch.zeros(n_rows, n_keys, dtype=torch.bool, device=device)
        if self.exclude_bos:
            out |= keys == 0
        if self.exclude_current_token:
            out |= keys == rows
        return out

    def scored_pattern(
        self, pattern: Float[Tensor, "batch head_index rows key_pos"]
    ) -> Float[Tensor, "batch head_index rows key_pos"]:
        """``pattern`` as the scores see it: excluded entries 0, as ``detect_head`` does ("mul"),
        and in float32 when the model runs in bfloat16 or float16.

        The upcast is exact, and it makes every sum a score takes over keys, rows and prompts a
        float32 one (a bfloat16 sum over a few hundred keys is off by ~0.4%): a half-precision
        model's scores differ from float32's by what its weights and forward pass change, not by
        how they are reduced (``tests/test_half_precision.py``). A new tensor when anything is
        excluded or upcast; the model's own activation is never changed."""
        if pattern.dtype in (torch.bfloat16, torch.float16):
            pattern = pattern.float()
        excluded = self.excluded(pattern.shape[-2], pattern.shape[-1], pattern.device)
        return pattern if excluded is None else pattern.masked_fill(excluded, 0)

    def mass_left(
        self, pattern: Float[Tensor, "batch head_index rows key_pos"]
    ) -> Float[Tensor, "batch head_index"] | None:
        """The attention mass of the real rows that is not excluded (``scored_pattern`` already
        zeroed it), or None when nothing is excluded. Under ``normalize="all_rows"`` a pattern
        ratio's denominator is the number of real rows, which is the whole mass (rows sum to 1);
        with exclusions it is this, so that a score is ``sum(p * t) / sum(p)`` as in detect_head
        (``scoring.fused`` does this for the linear built-ins; ``DetectionPattern`` divides by the
        mass of the pattern it is given anyway)."""
        if not (self.exclude_bos or self.exclude_current_token):
            return None
        real = self.mask.to(pattern.device)[:, self.query_rows(pattern.shape[-2])].float()
        return (pattern.float().sum(-1) * real[:, None, :]).sum(-1)

    @property
    def query_mask(self) -> Bool[Tensor, "batch query_pos"]:
        return self.mask

    def str_tokens(self, i: int) -> list[str]:
        from lens_attn.probes import str_tokens

        n = int(self.mask[i].sum())
        return str_tokens(self.model, self.tokens[i, :n])


@dataclass
class PromptRatio:
    """Per-prompt ``numerator / denominator``; prompts with ``denominator == 0`` don't count.

    ``numerator``: ``[batch, head_index]``; ``denominator``: ``[batch, head_index]`` or ``[batch, 1]``.
    The score is the mean of the ratio over prompts, with its standard error.
    """

    numerator: Float[Tensor, "batch head_index"]
    denominator: Float[Tensor, "batch _"]


class Analysis:
    """Base class of every score. Subclasses set ``name``, ``hooks`` and implement ``reduce``/``finalize``.

    - ``reduce(layer, acts, batch)`` gets ``acts`` = {hook: activation of this layer} and returns a dict of
      tensors with a leading ``head_index`` axis (any trailing shape). They are summed over batches.
    - ``finalize(state)`` gets those sums stacked over layers, ``[layer, head_index, ...]``, and returns
      ``{score_name: (value [layer, head_index], stderr [layer, head_index])}``.
    - ``from_weights(model)`` (optional) returns the same kind of dict straight from the weights; such an
      analysis has ``hooks = ()``.
    """

    name: str = ""
    hooks: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # score names produced; defaults to (name,)
    # True if ``reduce`` accepts a block of query rows of the pattern (rows
    # ``batch.query_rows(n)``, all keys) and its state adds up over blocks; see chunked scoring
    chunkable: bool = False

    def score_names(self) -> tuple[str, ...]:
        return self.outputs or (self.name,)

    def reduce(self, layer: int, acts: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def finalize(self, state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def from_weights(self, model) -> dict[str, tuple[Tensor, Tensor]] | None:
        return None


class RatioAnalysis(Analysis):
    """An analysis whose score is the mean over prompts of a ``PromptRatio`` (see module docstring)."""

    def __init__(
        self,
        name: str,
        fn: Callable[[int, dict, Batch], PromptRatio],
        hooks: tuple[str, ...],
        *,
        chunkable: bool = False,
    ):
        self.name, self.fn, self.hooks, self.chunkable = name, fn, tuple(hooks), chunkable
        self.__doc__ = fn.__doc__

    def ratio(self, layer: int, acts: dict[str, Tensor], batch: Batch) -> PromptRatio:
        ratio = self.fn(layer, acts, batch)
        if not isinstance(ratio, PromptRatio):
            raise TypeError(
                f"analysis {self.name!r} must return a PromptRatio, got {type(ratio).__name__}"
            )
        return ratio

    def reduce(self, layer, acts, batch):
        return self.state(self.ratio(layer, acts, batch))

    def state(self, ratio: PromptRatio) -> dict[str, Tensor]:
        """Per-prompt ratio -> summable state (sum, sum of squares, count of prompts)."""
        num, den = ratio.numerator.float(), ratio.denominator.float().expand_as(ratio.numerator)
        counted = den > 0
        value = torch.where(counted, num / den.clamp_min(1e-30), torch.zeros_like(num))
        value = value.to(_accumulation_dtype(value.device))  # float64 keeps sum_sq - n*mean^2 exact
        # summed over prompts; transposed so head_index leads
        return {"sum": value.sum(0), "sum_sq": (value**2).sum(0), "count": counted.float().sum(0)}

    def finalize(self, state):
        return {self.name: mean_and_stderr(state["sum"], state["sum_sq"], state["count"])}


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def mean_and_stderr(
    total: Tensor, total_sq: Tensor, count: Tensor
) -> tuple[Float[Tensor, "layer head_index"], Float[Tensor, "layer head_index"]]:
    """Mean and standard error of the mean from sums (sample variance, n - 1); NaN where undefined."""
    n = count.double()
    mean = total.double() / n
    var = (total_sq.double() - n * mean**2).clamp_min(0) / (n - 1)
    stderr = torch.sqrt(var / n)
    stderr = torch.where(n > 1, stderr, torch.full_like(stderr, float("nan")))
    return mean.float(), stderr.float()


# ------------------------------------------------------------------------------------------- registry


def hook_name(model, hook: str, layer: int, *, hook_dict: dict | None = None) -> str:
    """Full hook name of ``hook`` in ``layer``; unknown hooks are refused with close matches.

    ``hook_dict``: ``model.hook_dict`` read once by a caller naming many hooks (a
    ``TransformerBridge`` rebuilds it, with its aliases, on every read: about 1 ms each)."""
    name = f"blocks.{layer}.{hook}" if "." in hook else get_act_name(hook, layer)
    hook_dict = model.hook_dict if hook_dict is None else hook_dict
    if name not in hook_dict:
        per_layer = sorted(
            {n.split(".", 2)[2] for n in hook_dict if n.startswith(f"blocks.{layer}.")}
        )
        short = sorted({n.rsplit("hook_", 1)[-1] for n in per_layer})
        close = difflib.get_close_matches(hook, short + per_layer, n=4)
        raise ValueError(
            f"hook point {hook!r} does not exist in layer {layer} ({name}); "
            f"close matches: {', '.join(close) or 'none'}; per-layer hooks: {', '.join(per_layer)}"
        )
    return name


# ---------------------------------------------------------------------------------- detection patterns


class DetectionPattern(RatioAnalysis):
    """A user-supplied detection pattern, scored like TransformerLens's ``detect_head``.

    ``fn(tokens)`` takes one prompt's real tokens ``[pos]`` and returns a ``[query_pos, key_pos]`` mask
    (lower-triangular, ``pos x pos``). ``measure="mul"``: the share of the head's attention on the
    mask, per prompt; ``measure="abs"``: ``1 - mean_rows(sum_keys |pattern - mask|)``, the same as
    ``detect_head(..., error_measure="abs")`` before its rounding.
    """

    hooks = ("pattern",)
    chunkable = True

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor], *, measure: Measure = "mul"):
        if measure not in get_args(Measure):
            raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(get_args(Measure))}")
        self.name, self.fn, self.measure = name, fn, measure

    def target(self, tokens: Int[Tensor, " pos"]) -> Float[Tensor, "query_pos key_pos"]:
        n = len(tokens)
        mask = torch.as_tensor(self.fn(tokens)).float()
        if mask.shape != (n, n):
            raise ValueError(
                f"detection pattern {self.name!r} has shape {tuple(mask.shape)}; "
                f"it must be [query_pos, key_pos] = ({n}, {n}) for a {n}-token prompt"
            )
        if torch.triu(mask, diagonal=1).abs().sum() > 0:
            raise ValueError(
                f"detection pattern {self.name!r} is not lower-triangular: a query can only attend "
                "to keys at or before it"
            )
        return mask

    def ratio(self, layer, acts, batch):
        pattern = acts["pattern"].float()  # [batch, head_index, rows, key_pos]: a block of rows
        rows = batch.query_rows(pattern.shape[2])
        num, den = [], []
        for i in range(len(batch.tokens)):
            n = int(batch.mask[i].sum())
            key = ("detection", self.name, i)
            if key not in batch.scratch:  # once per prompt, not per layer
                batch.scratch[key] = self.target(batch.tokens[i, :n].cpu())
            target = torch.zeros(pattern.shape[2], pattern.shape[3])
            block = batch.scratch[key][rows]  # the real rows of this block
            target[: len(block), :n] = block
            target = target.to(pattern.device)
            real = (torch.arange(rows.start, rows.start + pattern.shape[2]) < n).to(pattern.device)
            p = pattern[i] * real[None, :, None]  # [head_index, rows, key_pos]
            if self.measure == "mul":
                num.append((p * target).sum((-1, -2)))
                den.append(p.sum((-1, -2)))
            else:  # per real row: 1 - sum_k |p - t|; averaged over the prompt's n rows
                error = (p - target).abs()  # excluded entries count 0, as in detect_head
                excluded = batch.excluded(pattern.shape[2], pattern.shape[3], pattern.device)
                if excluded is not None:
                    error = error.masked_fill(excluded, 0)
                diff = (error * real[None, :, None]).sum((-1, -2))
                num.append(real.sum() - diff)
                den.append(torch.full_like(diff, float(real.sum())))  # adds up to n over blocks
        return PromptRatio(torch.stack(num), torch.stack(den))
