"""``lens_attn.confirm``: labelled heads tested by the ablation their label predicts should matter.

On tiny random models the verdicts are checked against sweeps recomputed here with
``ablation_sweep`` and a median taken by hand; on the bundled checkpoint (skipped until it is built)
the induction head found by ``score_heads`` must be the one whose ablation hurts induction most.
"""

import math

import pytest
import torch

from lens_attn.ablation.confirm import LABEL_TESTS, ConfirmResult, confirm, default_probes
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.probes import induction_probes, repeated_token_probes
from lens_attn.scoring.results import HeadScores


def _probe_sets(model):
    return {
        "repeated_random": induction_probes(model, periods=(5, 7), n_per_period=3, seed=2),
        "natural": repeated_token_probes(model, n=4, length=12, pool=50, seed=3),
        "repeated_tokens": repeated_token_probes(model, n=4, length=14, pool=6, seed=4),
    }


LABELS = {
    (0, 1): ("previous_token",),
    (1, 2): ("induction",),
    (1, 3): ("induction", "duplicate_token"),
    (2, 0): ("attention_sink",),
    (2, 1): ("my_label",),  # unknown labels get the default test
}


def test_confirm_matches_hand_computed_verdicts(tiny_model, tmp_path):
    probes = _probe_sets(tiny_model)
    result = confirm(tiny_model, labels=LABELS, probes=probes)
    assert sorted(result.sweeps) == [
        "natural/loss", "repeated_random/induction_loss", "repeated_tokens/loss",
    ]  # fmt: skip
    unlabelled = {(layer, h) for layer in range(3) for h in range(6)} - set(LABELS)
    expected_rows = []
    for (layer, head), labels in sorted(LABELS.items()):
        for label in labels:
            for kind, metric in LABEL_TESTS.get(label, (("natural", "loss"),)):
                expected_rows.append((layer, head, label, kind, metric))
    rows = [(t.layer, t.head, t.label, t.probes, t.metric) for t in result.tests]
    assert rows == expected_rows
    sweeps = {}
    for t in result.tests:
        key = (t.probes, t.metric)
        if key not in sweeps:  # independent sweep, same probes
            sweeps[key] = ablation_sweep(tiny_model, probes[t.probes], metric=t.metric).grid()
        grid = sweeps[key]
        median = torch.stack([grid[h] for h in sorted(unlabelled) if h[0] == t.layer]).median()
        assert t.delta == pytest.approx(float(grid[t.layer, t.head]), abs=1e-5)
        assert t.median_unlabelled_delta == pytest.approx(float(median), abs=1e-5)
        assert t.confirmed == (t.delta > 0 and t.delta > t.median_unlabelled_delta)
        margin = t.delta - t.median_unlabelled_delta
        assert t.significant == (t.confirmed and margin > 2 * t.stderr)
        if t.median_unlabelled_delta > 0:
            assert t.ratio == pytest.approx(t.delta / t.median_unlabelled_delta)
        else:
            assert math.isnan(t.ratio)
        assert t.ablated == pytest.approx(t.baseline + t.delta, abs=1e-5)
    df = result.to_dataframe()
    assert {"layer", "head", "label", "metric", "baseline", "ablated", "delta",
            "median_unlabelled_delta", "confirmed"} <= set(df.columns)  # fmt: skip
    result.save(tmp_path / "confirm")
    loaded = ConfirmResult.load(tmp_path / "confirm")
    assert loaded.to_dataframe().equals(df)
    assert loaded.sweeps["natural/loss"].units == result.sweeps["natural/loss"].units


def test_labels_from_head_scores_and_layer_without_unlabelled_heads(tiny_model):
    values = {name: torch.zeros(3, 6) for name in ("induction", "previous_token", "bos")}
    values["induction"][1, :] = 0.9  # every head of layer 1 is an induction head
    values["previous_token"][0, 4] = 0.7
    scores = HeadScores(values, {k: torch.full((3, 6), math.nan) for k in values})
    probes = _probe_sets(tiny_model)
    result = confirm(tiny_model, scores, probes=probes, method="mean")
    assert result.method == "mean"
    assert {(t.layer, t.head, t.label) for t in result.tests if t.metric == "induction_loss"} == {
        *((1, h, "induction") for h in range(6)), (0, 4, "previous_token"),
    }  # fmt: skip
    # layer 1 has no unlabelled head: it is compared with the unlabelled heads of every layer
    grid = result.sweeps["repeated_random/induction_loss"].grid()
    pool = [grid[layer, h] for layer in (0, 2) for h in range(6) if (layer, h) != (0, 4)]
    test = next(t for t in result.tests if (t.layer, t.head) == (1, 0))
    assert test.median_unlabelled_delta == pytest.approx(
        float(torch.stack(pool).median()), abs=1e-6
    )
    assert set(result.confirmed("induction")) <= {(1, h) for h in range(6)}


def test_bad_input_errors(tiny_model):
    with pytest.raises(ValueError, match="give head_scores"):
        confirm(tiny_model)
    with pytest.raises(ValueError, match=r"out of range for 3 layers x 6 heads"):
        confirm(tiny_model, labels={(3, 0): ("induction",)})
    with pytest.raises(ValueError, match="probes has no"):
        confirm(tiny_model, labels={(0, 0): ("induction",)}, probes={"natural": []})
    with pytest.raises((ValueError, TypeError), match="resample"):
        confirm(tiny_model, labels={(0, 0): ("induction",)}, method="knockout")


# ------------------------------------------------------------------------------ bundled checkpoint


@pytest.fixture(scope="module")
def bundled():
    from lens_attn.loading import BUNDLED_CHECKPOINT, load_model

    if not (BUNDLED_CHECKPOINT / "config.json").is_file():
        pytest.skip(f"bundled checkpoint not built yet ({BUNDLED_CHECKPOINT})")
    return load_model(device="cpu")


@pytest.mark.slow
def test_bundled_induction_heads_are_causal_and_confirmed(bundled):
    """The bundled model's induction heads, found by their patterns, are what induction needs.

    Measured (zero ablation, 32 induction probes): layer 1 holds eight induction heads that back
    each other up, so one of them alone costs 0.005..0.35 nats of induction_loss, and all eight
    together ~9. Layer 0's previous-token head (L0H0) and current-token head (L0H1) feed them and
    cost ~7.6 nats each, and one unlabelled layer-0 head (L0H3) costs 0.16, more than the
    top-scoring induction head alone (0.03): the issue's "top induction head beats every head not
    labelled induction/previous-token" does not hold head by head here, so the claims below are the
    ones that do: the induction heads beat every other head downstream of layer 0, and beat, as a
    group, the same number of the most harmful unlabelled heads.
    """
    from lens_attn.scoring.runner import score_heads

    probes = induction_probes(bundled, n_per_period=4)  # periods 23 and 41
    names = ["induction", "previous_token", "current_token"]
    scores = score_heads(bundled, probes, scores=names, progress=False)
    labels = scores.classify()
    induction = labels.heads_with("induction")
    top_layer, top_head, _ = scores.top("induction", 1)[0]
    assert (top_layer, top_head) in induction
    sweep = ablation_sweep(bundled, probes, metric="induction_loss")
    grid = sweep.grid()
    feeders = {"induction", "previous_token", "current_token"}
    others = [h for h, labs in labels.labels.items() if not feeders & set(labs) and h[0] > 0]
    strongest = max(float(grid[h]) for h in induction)
    assert strongest > max(float(grid[h]) for h in others)

    unlabelled = [h for h, labs in labels.labels.items() if not labs]
    worst = sorted(unlabelled, key=lambda h: -float(grid[h]))[: len(induction)]
    together = ablation_sweep(bundled, probes, metric="induction_loss", heads=[induction, worst])
    assert float(together.delta[0]) > 3 * float(together.delta[1])

    wanted = {
        h: labs for h, labs in labels.labels.items() if {"induction", "previous_token"} & set(labs)
    }
    natural = default_probes(bundled)["natural"][:4]
    result = confirm(bundled, labels=wanted, probes={"repeated_random": probes, "natural": natural})
    on_induction = [t for t in result.tests if t.metric == "induction_loss"]
    assert {(t.layer, t.head) for t in on_induction if t.label == "induction"} == set(induction)
    assert all(t.confirmed for t in on_induction)
