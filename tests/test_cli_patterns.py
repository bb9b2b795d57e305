"""Tests for ``lens-attn patterns`` (lens_attn.cli) on conftest's tiny random GQA checkpoint."""

import re
import subprocess
import sys

import pytest

from lens_attn.cli import main

PROMPT = "def f(x): return x + 1; def f(x): return x"


@pytest.fixture(scope="module")
def gqa_dir(tiny_checkpoints):
    return str(tiny_checkpoints["gqa"].path)


def test_patterns_writes_report_figures_and_prints_heatmaps(tmp_path, gqa_dir, capsys):
    out = tmp_path / "run"
    status = main(["patterns", PROMPT, "--model", gqa_dir, "--device", "cpu", "--layers", "0,2",
                   "--show", "2", "--out", str(out)])  # fmt: skip
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["layer0.png", "layer2.png", "report.html"]
    assert (out / "layer0.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '"layers":[0,2]' in page and "<title>lens-attn: def f(x): return x + 1" in page
    printed = capsys.readouterr().out
    assert "strongest heads" in printed
    first = re.search(r"^L(\d+)H(\d+) \(", printed, re.M)  # the strongest head's heatmap title
    assert f'"open_head":[{first.group(1)},{first.group(2)}]' in page  # the report opens on it
    assert printed.count("(rows: query (destination), columns: key (source)") == 2
    assert any(c in printed for c in "░▒▓█")
    assert f"wrote {out / 'report.html'}" in printed


def test_patterns_passes_the_shared_options_to_load_model(tmp_path, monkeypatch, tiny_model):
    import lens_attn.loading

    calls = []

    def fake_load_model(source=None, **kwargs):
        calls.append((source, kwargs))
        return tiny_model

    monkeypatch.setattr(lens_attn.loading, "load_model", fake_load_model)
    assert main(["patterns", "a b a b", "--backend", "bridge", "--dtype", "bfloat16",
                 "--device", "cpu",
                 "--show", "0", "--layers", "0", "--out", str(tmp_path)]) == 0  # fmt: skip
    assert calls == [
        (
            None,
            {
                "backend": "bridge",
                "device": "cpu",
                "dtype": "bfloat16",
                "n_devices": 1,
                "progress": True,
            },
        )
    ]


def test_scores_feed_the_report_grid_and_the_ranking(tmp_path, monkeypatch, tiny_model, capsys):
    import torch

    import lens_attn.commands
    from lens_attn.scoring.results import HeadScores

    grid = torch.zeros(tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    grid[1, 4], grid[2, 0] = 0.9, 0.95  # L2H0 is the best, but layer 2 is not captured below
    HeadScores({"induction": grid}, {"induction": torch.zeros_like(grid)}).save(tmp_path / "s")
    monkeypatch.setattr(lens_attn.commands, "load_from_args", lambda args: tiny_model)
    argv = ["patterns", "a b c a b c", "--layers", "0,1", "--scores", str(tmp_path / "s"),
            "--rank-by", "induction", "--show", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "strongest heads (highest induction)" in printed and "L1H4 (0.90)" in printed
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert '"open_head":[1,4]' in page and '"names":["induction"]' in page
    assert main([*argv[:-2], "--rank-by", "nope", "--out", str(tmp_path / "run")]) == 2
    assert "no score named 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["patterns", "x", "--out", "d", "--backend", "jax"],
            "argument --backend: invalid choice: 'jax'",
        ),
        (
            ["patterns", "x", "--out", "d", "--layers", "a,b"],
            "argument --layers: expected comma-separated",
        ),
        (["patterns", "x", "--out", "d", "--dtype", "int8"], "argument --dtype: invalid choice"),
        (["patterns", "x", "--out", "d", "--rank-by", "induction"], "--rank-by needs --scores DIR"),
        (["patterns", "x"], "the following arguments are required: --out"),
        ([], "the following arguments are required: COMMAND"),
    ],
    ids=["backend", "layers", "dtype", "rank-by", "no-out", "no-command"],
)
def test_wrong_options_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lens-attn") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_library_errors_print_one_line_without_traceback(tmp_path, gqa_dir, capsys):
    status = main(["patterns", PROMPT, "--model", gqa_dir, "--device", "cpu", "--layers", "7",
                   "--out", str(tmp_path), "--quiet"])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lens-attn: error: layer(s) [7] out of range") and "\n" not in err


def test_missing_scores_directory_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["patterns", "x", "--scores", str(missing), "--out", str(tmp_path)]) == 2
    expected = f"{missing / 'scores.json'} does not exist; HeadScores.save(directory) writes it"
    assert capsys.readouterr().err == f"lens-attn: error: {expected}\n"


def test_module_entry_point_in_a_real_process(tmp_path):
    """``python -m lens_attn.cli`` runs main and exits with its status (a usage error here, which
    needs no torch import and so stays fast)."""
    done = subprocess.run(
        [sys.executable, "-m", "lens_attn.cli", "patterns", "x", "--backend", "jax", "--out", "d"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("lens-attn patterns: error: argument --backend")
    assert "Traceback" not in done.stderr
