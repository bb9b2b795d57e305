"""Test head labels causally: does ablating a labelled head hurt what its label says it does?

    >>> scores = lens_attn.score_heads(model, progress=False)
    >>> result = lens_attn.confirm(model, scores, progress=False)  # labels from scores.classify()
    >>> (1, 5) in result.confirmed("induction")
    True

Each label is tested by the ablation it predicts should matter, measured on the probes that need it:

==================  ==================  ===============  ======  ===================================
label               probes              metric           path    why
==================  ==================  ===============  ======  ===================================
induction           repeated_random     induction_loss   total   induction predicts the second copy
previous_token      repeated_random     induction_loss   total   feeds induction (K-composition)
duplicate_token     ioi                 logit_diff       total   marks the repeated name (the
                                                                 subject) so that later heads
                                                                 choose the other one
attention_sink      natural             loss             mean    a resting head: replacing its
                                                                 output by its mean is benign
current_token       natural             loss             total   keeps the token's own identity
copying             repeated_random     induction_loss   direct  its OV circuit writes the attended
                                                                 token into the logits: on the
                                                                 second copy that is the answer
copy_suppression    ioi                 answers_logprob  direct  ablated, the names in context
                                                                 get likelier (McDougall et al.
                                                                 2023: it suppresses what it
                                                                 attends to and the model predicts)
successor           ordinal             loss             total   writes the next day, month, number
previous_n          natural             loss             total   carries the token k back
name_mover          ioi                 logit_diff       direct  copies IO (Wang et al. 2022)
negative_name_mover ioi                 logit_diff       direct  writes against IO (harm: a drop)
retrieval           retrieval           induction_loss   total   copies the needle (Wu et al. 2024)
(other)             natural             loss             total   a general test for user-defined
                                                                 labels
==================  ==================  ===============  ======  ===================================

``path``: ``total`` ablates the head everywhere (``ablation_sweep``) with the run's ``method``;
``direct`` takes its output out of the final residual stream only (``ablation_sweep(direct=True)``),
later layers still reading it; ``mean`` ablates it everywhere with ``method="mean"`` whatever the
run's method. A resting head's claim is that it carries nothing about the prompt, not that its
constant write is unused: on SmolLM2, zero-ablating the 92 sink heads one layer at a time moves
natural text's loss by up to 0.44 nats (layer 21), mean-ablating them by at most 0.05; each head
alone is shown within 0.05 nats (TOST p < 0.01, 8 prompts) for 69 of 92 heads zero-ablated, 85 of
92 mean-ablated. copying is a claim about the direct path (Elhage et al.'s ``W_E W_OV W_U``): on SmolLM2 its 52
heads zero-ablated outright raise every loss tried *less* than random same-layer sets (repeated
tokens +0.23 vs +1.2..+3.9 nats; induction +1.2 vs +5.9..+10.7); their direct path alone costs
+0.72 nats of induction loss while random same-layer sets' direct paths cost at most -0.03. On
repeated-token probes (pool of 20) the attended token is the answer only by chance: there the
bundled model's copying (= induction) heads' direct path lowers the loss.

duplicate_token is tested where Wang et al. 2022 found such heads at work, on indirect-object
sentences (``lens_attn.probes.ioi_probes``), by the drop of the logit difference between the
indirect object and the repeated subject. On SmolLM2 its 2 heads raised no loss more than random
same-layer sets (repeated tokens +0.12 vs up to +0.14 nats); on discover's 32 IOI sentences they
lower the logit difference by 0.83 together, random same-layer sets by at most 0.40, and by 0.28
(L14H3) and 0.46 (L8H1) alone. A model whose vocabulary has no two one-token names gets the old
test, repeated tokens' loss (``FALLBACK_TESTS``). For a metric where higher is better (``logit_diff``) "hurts" below means
"lowers" (``metrics.harm_sign``); ``group_null_max`` is then the lowest random set's delta.

copy_suppression is tested on the IOI sentences, where McDougall et al. 2023 show copy
suppression at work (GPT-2's negative name movers): the head attends to a name the model is about
to predict and lowers it. On SmolLM2 its two heads' direct writes lower the in-context names'
logits more than any other head's at the last position (L23H3 -1.45, L24H4 -0.77 logits, mean of
IO and S, 48 sentences; the median head +0.008); on repeated random tokens L23H3 does nothing to
the copy (+0.002 nats, ablated), so ``copy_logprob`` there is only the fallback for a model
without one-token names.

previous_token is not tested on natural text's loss: on SmolLM2 its 5 heads together cost +0.18
nats there while random 5-head sets of the same layers cost up to +0.50; what the label predicts
is the induction circuit it feeds. Null sets never hold a head whose label is measured on the
same probes and metric, on either path (so copying's null sets hold no induction heads).

Each test asks a question the label can answer even when heads back each other up (the plan in
``lens_attn.ablation.plan`` lists what is ablated; nothing else is). Every answer is a one-sided
p-value (``lens_attn.ablation.stats``):

1. **group** (``group_p``): do the label's heads ablated together hurt the metric more than
   random size-matched sets from the same layers? The group's mean effect against the ``n_null``
   random sets' mean effects by the t prediction interval (``stats.prediction_t_p``). A test that
   assumes nothing about how random sets' effects are spread cannot go below ``1/(n_null + 1)``
   (the group is one of ``n_null + 1`` exchangeable sets: the rank test used before, 1/7 with 6
   sets), and ~100 sets per label would cost SmolLM2 minutes of ablations. A test over prompts
   (a sign flip of ``group - mean(null sets)`` per prompt) reaches ``2**-n`` but ignores how much
   random sets differ from each other: with a random set as the "label" it rejected at 0.05 in
   16-56% of draws on the bundled model (``experiments/calibrate_confirm.py``). The t prediction
   test assumes the random sets' effects are normal; measured there, it rejected in 0.9-13% of
   draws (heavy-tailed set effects make it liberal; two lumps, conservative). A ``group_p`` far
   below 1e-6 rests on the normal tail: read it as "far beyond every random set", not literally.
2. per head (``head_p``), **single**: does the head alone hurt more than the (lower) median of
   ``n_null_single`` random unlabelled heads of the same layers? A sign-flip test over prompts of
   ``sign * delta - floor``; or **context**: does ablating the head on top of the rest of its
   group hurt (``context_delta = delta(group) - delta(group minus head)``, the head's effect once
   its backups are gone)? A sign-flip test of the per-prompt context effects. Exact under their
   nulls (a prompt's value as likely positive as negative), no normality assumed, down to
   ``2**-n`` on ``n`` prompts. ``head_p`` is the better of the two, doubled (Bonferroni).
3. the row's ``p`` is ``max(group_p, head_p)`` (an intersection-union test: both claims must
   hold, so the row is as calibrated as the weaker one; with a random "label" the group test
   alone bounds it). ``decided_by`` names the test that gave it (``group`` when the group test is
   the weaker). Heads past the plan's ``max_heads`` have no test of their own: their rows carry
   ``group_p`` (``decided_by="group_only"``), and discover's table counts them apart.

A benign label (``attention_sink``, a resting head) claims no effect: its mean ablation changes
the loss by less than ``benign_bound`` nats. A failed test of harm is no evidence of that, so each
row carries the p-value of two one-sided sign-flip tests (TOST, ``stats.tost_p``) that the mean
change lies inside ``(-benign_bound, benign_bound)``: of the heads' layer group where that test is
already significant (``decided_by="group_benign"``; ``verdicts.layer_shown_benign``), otherwise of
the head alone (``single_benign``, a second sweep), or of the layer group where the head was not
ablated alone (``layer_group``: a plan made by hand without it).

Then across every row of the run, one hypothesis per (head, label, test), ``p_adjusted`` is the
Benjamini-Hochberg adjusted p-value (``correction="holm"`` for Holm's): BH keeps the expected share
of false confirmations among the confirmed at ``alpha``, the error a table of hundreds of head
claims is read for; Holm keeps the chance of any false one at ``alpha``, which costs most of the
power over hundreds of rows. BH assumes independent or positively dependent p-values; rows that
share a group's p-value, or prompts, are positively dependent. A row is ``significant`` and its
head ``confirmed`` for the label when ``p_adjusted < alpha`` (0.05).
"""

import functools
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lens_attn import probes as _probes
from lens_attn.ablation import stats
from lens_attn.ablation.methods import AblationMethod, check_method
from lens_attn.ablation.plan import BENIGN_LABELS, Test, plan_confirm, test_key
from lens_attn.ablation.result import AblationResult
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.ablation.verdicts import (
    Effects,
    LabelTest,
    benign_verdicts,
    decide,
    label_verdicts,
    layer_shown_benign,
)
from lens_attn.files import load_json, nan_for_null, save_table_and_json
from lens_attn.heads import head_label
from lens_attn.probes import Probe, builtin_probes, group_by_kind

LABEL_TESTS: dict[str, tuple[Test, ...]] = {  # label -> (probes, metric, path) of each test
    "induction": (("repeated_random", "induction_loss", "total"),),
    "previous_token": (("repeated_random", "induction_loss", "total"),),
    "duplicate_token": (("ioi", "logit_diff", "total"),),
    "attention_sink": (("natural", "loss", "mean"),),
    "current_token": (("natural", "loss", "total"),),
    "copying": (("repeated_random", "induction_loss", "direct"),),
    "copy_suppression": (("ioi", "answers_logprob", "direct"),),
    "successor": (("ordinal", "loss", "total"),),
    "previous_n": (("natural", "loss", "total"),),
    "name_mover": (("ioi", "logit_diff", "direct"),),
    "negative_name_mover": (("ioi", "logit_diff", "direct"),),
    "retrieval": (("retrieval", "induction_loss", "total"),),
}
DEFAULT_TEST: tuple[Test, ...] = (("natural", "loss", "total"),)
CONFIRM_ONLY_PROBES = ("ioi", "ordinal", "retrieval")  # kinds only confirm reads (<kind>_probes)
# a label's tests where its probes can't be built for the model (no one-token names: no ioi)
FALLBACK_TESTS: dict[str, tuple[Test, ...]] = {
    "duplicate_token": (("repeated_tokens", "loss", "total"),),
    "copy_suppression": (("repeated_random", "copy_logprob", "direct"),),
    "successor": DEFAULT_TEST,
    "name_mover": DEFAULT_TEST,
    "negative_name_mover": DEFAULT_TEST,
    "retrieval": DEFAULT_TEST,
}


@dataclass
class ConfirmResult:
    """Every (labelled head, label, test) with its effect and verdict; the sweeps behind them."""

    tests: list[LabelTest]
    sweeps: dict[str, AblationResult]  # plan.test_key: "<probes>/<metric>[/direct]" -> the sweep
    method: str
    provenance: dict = field(default_factory=dict)

    def confirmed(self, label: str | None = None) -> list[tuple[int, int]]:
        """Heads confirmed on every test of ``label`` (of any label if ``None``)."""
        heads: dict[tuple[int, int], bool] = {}
        for t in self.tests:
            if label is None or t.label == label:
                key = (t.layer, t.head)
                heads[key] = heads.get(key, True) and t.confirmed
        return sorted(h for h, ok in heads.items() if ok)

    def coverage(self) -> dict:
        """Heads with a specific confirmed label: confirmed on every test of a label other than
        the benign ones (``attention_sink`` alone is not a finding), over all the model's heads.

        ``{"heads": all heads, "labelled": heads with such a label, "confirmed": those confirmed,
        "share": confirmed / heads}``.
        """
        total = self.provenance.get("n_heads_total", math.nan)
        specific = {t.label for t in self.tests if t.label not in BENIGN_LABELS}
        labelled = {(t.layer, t.head) for t in self.tests if t.label in specific}
        confirmed = {h for label in specific for h in self.confirmed(label)}
        share = len(confirmed) / total if total else math.nan
        return {"heads": total, "labelled": len(labelled), "confirmed": len(confirmed),
                "share": share}  # fmt: skip

    def to_dataframe(self):
        import pandas as pd

        columns = list(LabelTest.__dataclass_fields__)
        rows = [{**asdict(t), "unit": head_label(t.layer, t.head)} for t in self.tests]
        return pd.DataFrame(rows, columns=["unit", *columns])

    def save(self, directory: "str | os.PathLike") -> Path:
        """``confirm.csv``, ``confirm.json``, and one sub-directory per sweep."""
        for key, sweep in self.sweeps.items():
            sweep.save(Path(directory) / key.replace("/", "__"))
        payload = {
            "tests": [asdict(t) for t in self.tests],
            "sweeps": list(self.sweeps),
            "method": self.method,
            "provenance": self.provenance,
        }
        return save_table_and_json(directory, "confirm", self.to_dataframe(), payload)

    @classmethod
    def load(cls, directory: "str | os.PathLike") -> "ConfirmResult":
        payload = load_json(directory, "confirm", "ConfirmResult")
        sweeps = {
            key: AblationResult.load(Path(directory) / key.replace("/", "__"))
            for key in payload["sweeps"]
        }
        floats = [k for k, f in LabelTest.__dataclass_fields__.items() if f.type is float]
        # strict JSON wrote NaN (e.g. the stderr of a single prompt) as null
        # runs before the direct path have no "path" (every test was a total one); runs before
        # the corrected p-values have no head_p, p, p_adjusted (NaN)
        old = {"path": "total", "head_p": None, "p": None, "p_adjusted": None}
        tests = [
            LabelTest(**{**old, **t, **{k: nan_for_null({**old, **t}[k]) for k in floats}})
            for t in payload["tests"]
        ]
        return cls(tests, sweeps, payload["method"], payload.get("provenance", {}))


def _labels_of(head_scores, labels) -> dict[tuple[int, int], tuple[str, ...]]:
    if labels is None:
        if head_scores is None:
            raise ValueError("give head_scores (HeadScores, classified here) or labels=")
        labels = head_scores.classify()
    labels = getattr(labels, "labels", labels)  # HeadLabels or a plain dict
    if not isinstance(labels, dict):
        raise ValueError("labels must be HeadLabels or a dict {(layer, head): ('induction', ...)}")
    out = {}
    for key, value in labels.items():
        out[(int(key[0]), int(key[1]))] = (value,) if isinstance(value, str) else tuple(value)
    return out


def default_probes(model, *, seed: int = 0) -> dict[str, list[Probe]]:
    """``builtin_probes`` by kind (repeated_random 32, natural 32, repeated_tokens 16, sized to
    the context) and ``CONFIRM_ONLY_PROBES``: ioi (48), ordinal (32), retrieval (8) if made."""
    sets = group_by_kind(builtin_probes(model, seed=seed))
    made = {k: getattr(_probes, f"{k}_probes")(model, seed=seed) for k in CONFIRM_ONLY_PROBES}
    return {**sets, **{kind: probes for kind, probes in made.items() if probes}}


def label_tests(label: str, kinds=None) -> tuple[Test, ...]:
    """``label``'s tests (``LABEL_TESTS``, ``DEFAULT_TEST``): ``FALLBACK_TESTS`` where ``kinds``
    (the probe kinds at hand) lacks a kind they need."""
    tests = LABEL_TESTS.get(label, DEFAULT_TEST)
    if kinds is not None and label in FALLBACK_TESTS and any(k not in kinds for k, _, _ in tests):
        return FALLBACK_TESTS[label]
    return tests


def confirm(
    model,
    head_scores=None,
    *,
    labels=None,
    method: AblationMethod = "zero",
    probes: "dict[str, list[Probe]] | None" = None,
    n_null: int = 8,
    n_null_single: int = 5,
    benign_bound: float = 0.05,
    alpha: float = 0.05,
    correction: stats.Correction = "bh",
    max_prompts: int | None = None,
    max_batch: int | None = None,
    memory_budget_mb: int | float = 1024,
    seed: int = 0,
    plan=None,
    progress: bool = False,
) -> ConfirmResult:
    """Test every label: its heads together against random sets, then each head (module docstring).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        head_scores: ``HeadScores``; its ``classify()`` gives the labels unless ``labels`` is given.
        labels: ``HeadLabels`` or ``{(layer, head): ("induction", ...)}``; heads missing from it or
            with an empty tuple are the unlabelled heads.
        method: the ablation (``zero``, ``mean``, ``resample``, ``bos``, ``uniform``); ``mean`` and
            ``resample`` use each test's own probes as the reference.
        probes: ``{"repeated_random": [...], "natural": [...], "repeated_tokens": [...],
            "ioi": [...]}``, or ``None`` for ``default_probes(model)``. Only the sets a test needs
            are used.
        n_null: random size-matched sets each label's group is compared with.
        n_null_single: random unlabelled single heads whose median is the floor a head alone
            must beat.
        benign_bound: nats within which a benign label's ablation must leave the loss.
        alpha: a row is significant (and its head confirmed) when ``p_adjusted < alpha``.
        correction: ``"bh"`` (Benjamini-Hochberg, the default) or ``"holm"``, across every row.
        max_prompts: use at most this many prompts of each set (evenly spaced), or all.
        max_batch, memory_budget_mb: passed to ``ablation_sweep``.
        seed: seed of the default probes, of the random sets and of ``resample``.
        plan: a ``ConfirmPlan`` from ``plan_confirm`` (built here if ``None``).
        progress: show progress bars.
    """
    check_method(method)
    if correction not in ("bh", "holm"):
        raise ValueError(f"correction must be 'bh' or 'holm', got {correction!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    head_labels = _labels_of(head_scores, labels)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    bad = [h for h in head_labels if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(
            f"labelled heads {bad} out of range for {n_layers} layers x {n_heads} heads"
        )
    probe_sets = probes if probes is not None else default_probes(model, seed=seed)
    tests_of = functools.partial(label_tests, kinds=frozenset(probe_sets))
    needed = sorted(
        {test for labs in head_labels.values() for lab in labs for test in tests_of(lab)}
    )
    missing = sorted({kind for kind, _, _ in needed} - set(probe_sets))
    if missing:
        raise ValueError(f"probes has no {missing}; give sets for: {', '.join(probe_sets)}")
    probe_sets = {k: _subsample(v, max_prompts) for k, v in probe_sets.items()}
    if plan is None:
        plan = plan_confirm(model, head_labels, probe_sets, tests_of=tests_of, n_null=n_null,
                            n_null_single=n_null_single, memory_budget_mb=memory_budget_mb,
                            seed=seed)  # fmt: skip

    def sweep(test: Test, units) -> AblationResult:
        kind, metric, path = test
        how = "mean" if path == "mean" else method
        return ablation_sweep(
            model, probe_sets[kind], method=how, metric=metric, heads=[list(u) for u in units],
            reference=probe_sets[kind] if how in ("mean", "resample") else None,
            max_batch=max_batch, memory_budget_mb=memory_budget_mb, seed=seed,
            direct=path == "direct", progress=progress,
        )  # fmt: skip

    sweeps: dict[str, AblationResult] = {}
    index: dict[Test, dict] = {}
    for test, planned in plan.tests.items():  # one sweep per test: one clean run per prompt chunk
        units = list(planned.units)
        sweeps[test_key(test)] = sweep(test, units)
        index[test] = {u: i for i, u in enumerate(units)}

    for test in plan.tests:  # benign layers not shown benign: each head alone
        key, idx = test_key(test), index[test]
        effects = Effects(sweeps[key], idx)
        extra = [u for label, per_test in plan.roles.items() if label in BENIGN_LABELS
                 and test in per_test
                 for lg in per_test[test]["layer_group"]
                 if not layer_shown_benign(effects, lg, bound=benign_bound, alpha=alpha)
                 for u in per_test[test]["single_if_needed"]
                 if u[0] in lg and u not in idx]  # fmt: skip
        if extra:
            sweeps[key] = _concat([sweeps[key], sweep(test, extra)])
            idx.update({u: len(idx) + i for i, u in enumerate(extra)})

    tests = []
    for label, per_test in plan.roles.items():
        for test, roles in per_test.items():
            effects = Effects(sweeps[test_key(test)], index[test])
            verdict = benign_verdicts if label in BENIGN_LABELS else label_verdicts
            tests += verdict(effects, label, test, roles, bound=benign_bound, alpha=alpha)
    tests = decide(tests, alpha=alpha, correction=correction)
    tests.sort(key=lambda t: (t.layer, t.head, t.label, t.probes, t.metric, t.path))
    n_unlabelled = sum(1 for layer in range(n_layers) for h in range(n_heads)
                       if not head_labels.get((layer, h)))  # fmt: skip
    info = {"seed": seed, "n_unlabelled": n_unlabelled, "n_heads_total": n_layers * n_heads,
            "n_null": n_null, "n_null_single": n_null_single,
            "benign_bound": benign_bound, "alpha": alpha, "correction": correction,
            "passes": plan.passes,
            "prompts": {k: len(v) for k, v in probe_sets.items()}}  # fmt: skip
    return ConfirmResult(tests, sweeps, method, info)


def _concat(parts: list[AblationResult]) -> AblationResult:
    """One result with the units of ``parts`` (sweeps of the same prompts) in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return AblationResult(
        [u for p in parts for u in p.units], first.baseline_per_prompt,
        torch.cat([p.ablated_per_prompt for p in parts]), first.n_layers, first.n_heads,
        first.method, first.metric,
        provenance={**first.provenance, "path": "+".join(p.provenance.get("path", "?") for p in parts)},
    )  # fmt: skip


def _subsample(probes: list[Probe], n: int | None) -> list[Probe]:
    if n is None or len(probes) <= n:
        return list(probes)
    step = len(probes) / n
    return [probes[int(i * step)] for i in range(n)]
