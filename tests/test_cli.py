"""``lens-attn discover``, ``scores`` and ``ablate`` end to end: on a tiny random checkpoint directory
(so ``--model PATH`` is exercised) and, for discover, on the bundled checkpoint."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

import lens_attn
from lens_attn.cli import main
from lens_attn.compat import TL_VERSION
from lens_attn.loading import BUNDLED_CHECKPOINT
from lens_attn.probes import induction_probes

RUN_FILES = {
    "scores.csv",
    "scores.json",
    "labels.csv",
    "ablation.csv",
    "report.html",
    "run.json",
    "figures",
}


@pytest.fixture(scope="module")
def gqa_dir(tiny_checkpoints):
    return str(tiny_checkpoints["gqa"].path)


def test_discover_on_a_checkpoint_directory_writes_the_run_folder(tmp_path, gqa_dir, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "discover",
                "--model",
                gqa_dir,
                "--device",
                "cpu",
                "--batch-size",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 3 * 6 and {
        "layer",
        "head",
        "induction",
        "previous_token",
        "copying",
    } <= set(scores.columns)
    ablation = pd.read_csv(out / "ablation.csv")
    assert list(ablation.columns[:7]) == [
        "layer",
        "head",
        "label",
        "metric",
        "baseline",
        "ablated",
        "delta",
    ]
    run = json.loads((out / "run.json").read_text())
    assert (
        run["model_source"] == gqa_dir and run["config"]["n_heads"] == 6 and run["probe_seed"] == 0
    )
    assert run["versions"]["transformer_lens"].startswith(str(TL_VERSION[0]) + ".")
    assert any(p.suffix == ".png" for p in (out / "figures").iterdir())
    printed = capsys.readouterr().out
    assert "kind" in printed and f"open {out / 'report.html'}" in printed
    # every row carries its p-value, corrected across the run; confirmed only when significant
    assert {"p", "p_adjusted", "significant", "confirmed", "decided_by"} <= set(ablation.columns)
    assert ablation[["p", "p_adjusted"]].notna().all().all()
    assert (ablation.p_adjusted >= ablation.p - 1e-12).all()
    assert (ablation.confirmed == (ablation.p_adjusted < 0.05)).all()
    assert (ablation.significant == ablation.confirmed).all()
    # coverage: heads confirmed for a label other than attention_sink, over all 18 heads
    specific = ablation[(ablation.label != "attention_sink")]
    per_head = specific.groupby(["layer", "head", "label"]).confirmed.all()
    confirmed = {(layer, head) for (layer, head, _), ok in per_head.items() if ok}
    assert run["coverage"] == {"heads": 18, "labelled": specific[["layer", "head"]]
                               .drop_duplicates().shape[0], "confirmed": len(confirmed),
                               "share": len(confirmed) / 18}  # fmt: skip
    assert f"coverage: {len(confirmed)} of 18 heads" in printed
    confirm = run["confirm"]
    assert {k: confirm[k] for k in ("alpha", "correction", "n_null", "n_null_single")} == {
        "alpha": 0.05, "correction": "bh", "n_null": 8, "n_null_single": 5}  # fmt: skip
    assert confirm["own_tests_per_label"] is None  # the tiny run fits: every head its own tests
    assert set(confirm["prompts"]) >= {"repeated_random", "natural"}


def test_scores_and_ablate_subcommands(tmp_path, gqa_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat the cat sat\n\none two three one two three\n")
    assert (
        main(
            [
                "scores",
                "--model",
                gqa_dir,
                "--device",
                "cpu",
                "--prompts",
                str(prompts),
                "--scores",
                "induction,previous_token",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    table = pd.read_csv(tmp_path / "s" / "scores.csv")
    assert {"induction", "previous_token"} <= set(table.columns) and "entropy" not in table.columns
    assert (
        main(
            [
                "ablate",
                "--model",
                gqa_dir,
                "--device",
                "cpu",
                "--heads",
                "L1H3,L0H2",
                "--method",
                "mean",
                "--metric",
                "induction_loss",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    ablation = pd.read_csv(tmp_path / "a" / "ablation.csv")
    assert len(ablation) == 2 and {"baseline", "ablated", "delta", "stderr"} <= set(
        ablation.columns
    )
    assert capsys.readouterr().out.count("wrote") == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["ablate", "--out", "d", "--method", "zeroo"],
            "argument --method: invalid choice: 'zeroo'",
        ),
        (["ablate", "--out", "d", "--metric", "los"], "argument --metric: invalid choice: 'los'"),
        (
            ["discover", "--out", "d", "--batch-size", "0"],
            "argument --batch-size: must be a positive integer, got 0",
        ),
        (["scores", "--out", "d", "--normalize", "rows"], "argument --normalize: invalid choice"),
        (["discover", "--out", "d", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
    ids=["method", "metric", "batch-size", "normalize", "unknown-option"],
)
def test_wrong_values_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lens-attn") and message in last


def test_library_errors_are_one_line(tmp_path, gqa_dir, capsys):
    assert (
        main(
            [
                "ablate",
                "--model",
                gqa_dir,
                "--device",
                "cpu",
                "--heads",
                "L9H0",
                "--out",
                str(tmp_path),
                "--quiet",  # no "loading layers" line: stderr holds the error alone
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("lens-attn: error:") and "L9H0" in err and err.count("\n") == 1
    assert main(["scores", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["discover", "scores", "ablate", "patterns"])
def test_help_lists_every_option(command):
    done = subprocess.run(
        [sys.executable, "-m", "lens_attn.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    for option in ("--model", "--backend", "--device", "--dtype", "--out"):
        assert option in done.stdout
    if command != "patterns":
        assert "--batch-size" in done.stdout


@pytest.mark.skipif(
    not (BUNDLED_CHECKPOINT / "model.safetensors").exists(), reason="bundled checkpoint not built"
)
def test_discover_on_the_bundled_checkpoint_finds_the_independently_measured_induction_head(
    tmp_path,
):
    out = tmp_path / "run"
    assert main(["discover", "--device", "cpu", "--no-figures", "--out", str(out)]) == 0
    scores = pd.read_csv(out / "scores.csv")
    top = scores.sort_values("induction", ascending=False).iloc[0]
    # independent measurement: attention from the second copy of fresh [BOS, r, r] probes to the
    # token after the first occurrence, read straight off the captured patterns
    model = lens_attn.load_model(device="cpu")
    patterns = lens_attn.capture_patterns(
        model, induction_probes(model, periods=(31,), n_per_period=16, seed=5)
    )
    q = torch.arange(32, 63)
    direct = patterns.pattern[:, :, :, q, q - 30].mean(dim=(1, 3))
    assert (int(top["layer"]), int(top["head"])) == divmod(int(direct.argmax()), model.cfg.n_heads)
    labels = pd.read_csv(out / "labels.csv")
    row = labels[(labels["layer"] == top["layer"]) & (labels["head"] == top["head"])].iloc[0]
    assert "induction" in row["labels"]


@pytest.mark.hooked_only  # query_chunk
def test_discover_query_chunk_gives_the_same_scores(tmp_path, gqa_dir):
    for name, extra in [("full", []), ("chunked", ["--query-chunk", "5"])]:
        argv = ["discover", "--model", gqa_dir, "--device", "cpu", "--no-figures", *extra]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
    full, chunked = (pd.read_csv(tmp_path / n / "scores.csv") for n in ("full", "chunked"))
    # chunked scoring leaves out the scores that need whole rows (name_mover, retrieval)
    numeric = full.select_dtypes("number").columns.intersection(chunked.columns)
    # same maths on blocks of 5 query rows: float32 summation order only
    assert (full[numeric] - chunked[numeric]).abs().max().max() < 1e-5


def test_ablate_logit_diff_needs_the_ioi_sentences(tmp_path, gqa_dir, capsys):
    """``--metric logit_diff`` reads the IOI sentences' answers; other probes have none, and a
    vocabulary without one-token names has no IOI sentences: one-line errors, nothing written."""
    argv = ["ablate", "--model", gqa_dir, "--device", "cpu", "--metric", "logit_diff", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--probes", "natural", "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "use --probes ioi" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lens-attn: error: --probes ioi:") and err.count("\n") == 1
    assert not (tmp_path / "a").exists()  # refused before the folder is made
    assert not [f for f in (tmp_path / "b").iterdir() if not f.name.startswith(".")]
