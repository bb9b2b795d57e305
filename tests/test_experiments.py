"""The scripts in ``experiments/`` run in-process on the bundled checkpoint and show what they say.

``induction_circuit.py``'s thresholds come from measurements on the bundled checkpoint
(``lens_attn/data/tiny-llama-2``, zero ablation, repeated random probes of periods 23 and 41):

==============================================  ===========================================
quantity (top induction head L1H5)              measured (4, 8 and 16 probes per period,
                                                probe seeds 0, 1 and 3)
==============================================  ===========================================
clean induction score                           0.977 .. 0.980
with the previous-token head L0H0 ablated       0.036 .. 0.049   (drop >= 0.93)
with the control L0H4 ablated                   within 0.007 of clean
L0H0 ablated in layer 1's keys only             0.12 .. 0.16     (drop >= 0.82)
L0H0 ablated in layer 1's queries only          0.947 .. 0.956   (drop <= 0.032)
induction loss, clean / L0H0 / L0H4 ablated     0.011-0.026 / 7.61-7.63 / 0.015-0.093 nats
==============================================  ===========================================

Each threshold sits far from its measurement (a third of the score scale for the collapse, 7x the
largest measured change for the control) and far beyond the spread over probe seeds (~0.01), so
a different seed or a platform's float differences cannot flip it, while a broken ablation (hooks
dropped after the first batch, the wrong head, the wrong layer) or a retrained checkpoint without
the circuit fails it.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _script(name: str):
    """Import ``experiments/<name>.py`` as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundled():
    from lens_attn.loading import BUNDLED_CHECKPOINT, load_model

    if not (BUNDLED_CHECKPOINT / "config.json").is_file():
        pytest.skip(f"the bundled checkpoint {BUNDLED_CHECKPOINT} has not been built")
    return load_model(device="cpu")


@pytest.mark.slow
def test_induction_circuit_collapses_without_the_previous_token_head(bundled, tmp_path):
    figure, results_path = (
        tmp_path / "figures" / "circuit.png",
        tmp_path / "results" / "circuit.json",
    )
    argv = ["--n-per-period", "4", "--figure", str(figure), "--results", str(results_path)]
    results = _script("induction_circuit").main(argv, model=bundled)

    assert results["heads"] == {"induction": "L1H5", "previous_token": "L0H0", "control": "L0H4"}
    top = results["top_induction"]
    assert top["clean"] > 0.9
    assert top["clean"] - top["previous_token_ablated"] > 0.6  # measured >= 0.93
    assert abs(top["control_ablated"] - top["clean"]) < 0.05  # measured <= 0.007
    # K-composition: the collapse comes through layer 1's keys, not its queries
    assert top["clean"] - top["previous_token_keys_only"] > 0.5  # measured >= 0.82
    assert top["clean"] - top["previous_token_queries_only"] < 0.15  # measured <= 0.032
    loss = results["induction_loss"]
    assert loss["previous_token_ablated"] - loss["clean"] > 5.0  # measured 7.6 (chance: ln 2048)
    assert loss["control_ablated"] - loss["clean"] < 0.5  # measured <= 0.07

    assert json.loads(results_path.read_text()) == results
    assert figure.stat().st_size > 10_000
    assert not list(tmp_path.rglob("*.tmp*"))  # written through temporary names, renamed


@pytest.mark.slow
def test_ablation_stays_on_for_every_scoring_batch(bundled):
    """``with ablate(...)`` around ``score_heads``: the ablation's hooks (``hook_z``, layer 0) must
    survive every ``run_with_hooks`` of the scoring (``hook_pattern``), not only the first."""
    from lens_attn import ablate, induction_probes
    from lens_attn.scoring.runner import score_heads

    probes = induction_probes(bundled, n_per_period=2)
    with ablate(bundled, ["L0H0"], method="zero"):
        one_pass = score_heads(
            bundled, probes, scores=["induction"], batch_size=len(probes), progress=False
        )
        per_probe = score_heads(bundled, probes, scores=["induction"], batch_size=1, progress=False)
    clean = score_heads(bundled, probes, scores=["induction"], progress=False)
    # the same numbers, batched or not (float32 sums in another order: 1e-5 is ample)
    torch.testing.assert_close(per_probe["induction"], one_pass["induction"], rtol=0, atol=1e-5)
    assert float(clean["induction"][1, 5]) - float(per_probe["induction"][1, 5]) > 0.6


@pytest.mark.slow
def test_discover_heads_writes_its_run_folder(bundled, tmp_path):
    out = tmp_path / "runs" / "discover"
    _script("discover_heads").main(["--out", str(out), "--prompts-per-kind", "2"], model=bundled)
    names = {p.name for p in out.iterdir()}
    assert {
        "heads.csv",
        "scores.csv",
        "scores.json",
        "report.html",
        "figures",
        "sweep",
        "confirm",
    } <= names
    assert len(list((out / "figures").glob("*.png"))) == 9
    header = (out / "heads.csv").read_text().splitlines()[0].split(",")
    assert {"unit", "labels", "induction", "induction_loss_delta", "confirmed"} <= set(header)
    assert sorted(p.name for p in out.parent.iterdir()) == ["discover"]  # no temporary left
