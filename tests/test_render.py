"""Tests for lens_attn.render.figures (matplotlib), .terminal (text) and .notebook (CircuitsVis views).

The patterns are hand-built (no model): 3 layers, 3 heads, 7 tokens, so a swapped axis shows.
"""

import socket
import sys
import uuid

import numpy as np
import pytest
import torch

from lens_attn.patterns import AttentionPatterns
from lens_attn.render import figures, grids, notebook, terminal
from lens_attn.scoring.results import HeadScores

N_LAYERS, N_HEADS, N_TOKENS = 3, 3, 7
TOKENS = ["<s>", " The", " cat", " $5$", "\n", " cat", " sat"]


def causal_patterns(n_layers=N_LAYERS, n_heads=N_HEADS, tokens=TOKENS, layers=None, seed=0):
    """Random causal softmax patterns for one prompt, as capture_patterns would return them."""
    n = len(tokens)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_layers, 1, n_heads, n, n, generator=g)
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    pattern = logits.masked_fill(future, -torch.inf).softmax(dim=-1)
    return AttentionPatterns(
        pattern, layers or list(range(n_layers)), torch.zeros(1, n, dtype=torch.long),
        torch.ones(1, n, dtype=torch.bool), [list(tokens)],
    )  # fmt: skip


@pytest.fixture
def patterns():
    return causal_patterns()


def tick_texts(ax, axis):
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks]


# ------------------------------------------------------------------------------------ pattern maps


def test_plot_head_labels_ticks_and_data(patterns):
    fig = figures.plot_head(patterns, layer=1, head=2)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "query (destination)"
    assert ax.get_xlabel() == "key (source)"
    assert ax.get_title() == "L1H2"
    labels = [figures.token_label(t) for t in TOKENS]
    assert tick_texts(ax, "x") == labels and tick_texts(ax, "y") == labels
    assert r" \$5\$" in labels and "\\n" in labels  # no mathtext, newline made visible
    image = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(image, patterns.head(1, 2).numpy())  # rows query, columns key
    assert len(fig.axes) == 2  # the map and its colour bar


def test_window_shows_only_those_positions(patterns):
    fig = figures.plot_head(patterns, 0, 1, window=(2, 6))
    ax = fig.axes[0]
    np.testing.assert_array_equal(
        ax.get_images()[0].get_array(), patterns.head(0, 1)[2:6, 2:6].numpy()
    )
    assert tick_texts(ax, "x") == [figures.token_label(t) for t in TOKENS[2:6]]
    assert ax.get_xlabel() == "key (source), positions 2-5"
    with pytest.raises(ValueError, match="0 <= start < stop <= 7"):
        figures.plot_head(patterns, 0, 1, window=(3, 9))


def test_long_sequences_thin_their_tick_labels():
    tokens = [f"t{i}" for i in range(130)]
    fig = figures.plot_head(causal_patterns(n_layers=1, n_heads=1, tokens=tokens), 0, 0)
    ax = fig.axes[0]
    xs = ax.get_xticks()
    assert 20 <= len(xs) <= figures.MAX_TICK_LABELS
    assert tick_texts(ax, "x")[1] == tokens[int(xs[1])]  # labels stay on their own positions


def test_plot_layer_grid_shares_one_colour_scale(patterns):
    fig = figures.plot_layer(patterns, 2)
    maps = [ax for ax in fig.axes if ax.get_images() and ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in maps] == ["L2H0", "L2H1", "L2H2"]
    limits = {ax.get_images()[0].get_clim() for ax in maps}
    assert limits == {(0.0, float(patterns.layer(2).max()))}
    for head, ax in enumerate(maps):
        np.testing.assert_array_equal(
            ax.get_images()[0].get_array(), patterns.head(2, head).numpy()
        )
    assert maps[0].get_ylabel() == "query (destination)"
    assert any(ax.get_xlabel() == "key (source)" for ax in maps)


def test_plot_head_across_layers(patterns):
    fig = figures.plot_head_across_layers(patterns, head=1)
    titles = [ax.get_title() for ax in fig.axes if ax.get_images() and ax.get_title()]
    assert titles == ["L0H1", "L1H1", "L2H1"]


def test_plot_mean_over_heads(patterns):
    ax = figures.plot_mean_over_heads(patterns, 1).axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), patterns.layer(1).mean(0).numpy())


def test_plot_query_attention_bars_are_the_query_row(patterns):
    fig = figures.plot_query_attention(patterns, 1, 0, query_pos=-1)
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, patterns.head(1, 0)[-1].numpy(), rtol=1e-6)
    assert ax.get_xlabel() == "key (source)"
    assert len(figures.plot_query_attention(patterns, 1, 0, query_pos=3).axes[0].patches) == 4
    with pytest.raises(ValueError, match="positions 0..6"):
        figures.plot_query_attention(patterns, 1, 0, query_pos=7)


# ------------------------------------------------------------------------------------------ rollout


def test_attention_rollout_matches_a_hand_computation():
    # two heads per layer whose mean is the matrix written in the comment
    mean0 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    mean1 = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    heads0 = torch.stack(
        [
            mean0 + 0.1 * torch.tensor([[0, 0, 0], [1, -1, 0], [1, 0, -1.0]]),
            mean0 - 0.1 * torch.tensor([[0, 0, 0], [1, -1, 0], [1, 0, -1.0]]),
        ]
    )
    heads1 = torch.stack([mean1, mean1])
    pattern = torch.stack([heads0, heads1])[:, None]  # [layer, batch, head_index, q, k]
    patterns = AttentionPatterns(
        pattern,
        [0, 1],
        torch.zeros(1, 3, dtype=torch.long),
        torch.ones(1, 3, dtype=torch.bool),
        [["a", "b", "c"]],
    )
    # by hand: (A + I) with rows renormalised
    #   layer 0: [1, 0, 0], [.25, .75, 0], [.1, .15, .75]
    #   layer 1: [1, 0, 0], [.5, .5, 0], [0, .5, .5]
    # rollout = layer1 @ layer0:
    #   row 1 = .5*[1,0,0] + .5*[.25,.75,0] = [.625, .375, 0]
    #   row 2 = .5*[.25,.75,0] + .5*[.1,.15,.75] = [.175, .45, .375]
    expected = torch.tensor([[1.0, 0, 0], [0.625, 0.375, 0], [0.175, 0.45, 0.375]])
    rollout = figures.attention_rollout(patterns)
    torch.testing.assert_close(rollout, expected, atol=1e-6, rtol=0)  # float32 rounding only
    ax = figures.plot_rollout(patterns).axes[0]
    assert ax.get_title() == "attention rollout, layers 0-1"


def test_attention_rollout_rows_sum_to_one_and_needs_consecutive_layers(patterns):
    torch.testing.assert_close(figures.attention_rollout(patterns).sum(-1), torch.ones(N_TOKENS))
    gappy = causal_patterns(n_layers=2, layers=[0, 2])
    with pytest.raises(ValueError, match="consecutive layers"):
        figures.attention_rollout(gappy)


# ------------------------------------------------------------------------- layer x head heatmaps


@pytest.fixture
def scores():
    g = torch.Generator().manual_seed(1)
    values = {
        "induction": torch.rand(N_LAYERS, N_HEADS, generator=g),
        "previous_token": torch.rand(N_LAYERS, N_HEADS, generator=g),
    }
    return HeadScores(values, {k: torch.full_like(v, 0.01) for k, v in values.items()})


def test_plot_scores_is_the_score_grid(scores):
    fig = grids.plot_scores(scores, "induction")
    ax = fig.axes[0]
    np.testing.assert_array_equal(
        ax.get_images()[0].get_array(), scores.values["induction"].numpy()
    )
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
    assert len(ax.texts) == N_LAYERS * N_HEADS  # annotated
    with pytest.raises(ValueError, match="previous_token"):
        grids.plot_scores(scores, "inductoin")


def ablation_result():
    """An AblationResult of three single-head mean ablations in layer 1 (deltas -0.5, 0.25, 1)."""
    from lens_attn.ablation.result import AblationResult

    baseline = torch.tensor([1.0, 1.0])  # two prompts
    ablated = baseline[None] + torch.tensor([-0.5, 0.25, 1.0])[:, None]  # [unit, prompt]
    units = [[(1, head)] for head in range(N_HEADS)]
    return AblationResult(units, baseline, ablated, N_LAYERS, N_HEADS, "mean", "logit_diff")


def test_plot_ablation_centres_the_scale_and_greys_unablated_heads():
    ax = grids.plot_ablation(ablation_result()).axes[0]
    image = ax.get_images()[0]
    assert image.get_clim() == (-1.0, 1.0)  # symmetric around zero
    assert np.isnan(np.asarray(image.get_array().filled(np.nan))[0]).all()
    assert "mean ablation" in ax.get_title() and "logit_diff" in ax.get_title()
    assert len(ax.texts) == N_HEADS  # only ablated heads are annotated
    with pytest.raises(ValueError, match="grid"):
        grids.plot_ablation(object())


# ------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize(
    "suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")]
)
def test_save_figure_formats(tmp_path, patterns, suffix, magic):
    path = figures.save_figure(figures.plot_head(patterns, 0, 0), tmp_path / f"sub/head{suffix}")
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_save_figure_refuses_other_suffixes(tmp_path, patterns):
    with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
        figures.save_figure(figures.plot_head(patterns, 0, 0), tmp_path / "head.jpg")


def test_figures_need_no_display_and_no_pyplot(tmp_path, monkeypatch, patterns, scores):
    """Everything goes through the object API: with pyplot unimportable and no DISPLAY, every
    figure function still draws and saves (pyplot would pick a GUI backend and keep figures)."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # `import matplotlib.pyplot` fails
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND"):
        monkeypatch.delenv(name, raising=False)
    drawn = [
        figures.plot_head(patterns, 0, 0),
        figures.plot_layer(patterns, 1),
        figures.plot_head_across_layers(patterns, 2),
        figures.plot_mean_over_heads(patterns, 0),
        figures.plot_rollout(patterns),
        figures.plot_query_attention(patterns, 0, 1, 4),
        grids.plot_scores(scores, "induction"),
        grids.plot_ablation(ablation_result()),
    ]
    for i, fig in enumerate(drawn):
        assert figures.save_figure(fig, tmp_path / f"{i}.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------- terminal


def test_text_heatmap_rows_and_shades():
    pattern = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.0, 0.25, 0.75]])
    text = terminal.text_heatmap(pattern, ["<s>", " a", "b\n"], title="L0H0", vmax=1.0)
    lines = text.splitlines()
    assert lines[0].startswith("L0H0")
    # weight / vmax rounded to quarters: 1 -> █, .5 -> ▒, .25 -> ░, .75 -> ▓, 0 -> ' '
    assert [line.split("|")[1] for line in lines[1:]] == ["█  ", "▒▒ ", " ░▓"]
    assert "b\\n" in lines[3] and "·a" in lines[2]  # newline escaped, space visible
    # by default the scale is the largest weight outside row 0 (which can only attend to itself)
    rows = terminal.text_heatmap(pattern, ["<s>", " a", "b\n"]).splitlines()[1:]
    assert [line.split("|")[1] for line in rows] == ["█  ", "▓▓ ", " ░█"]  # .25/.75*4 -> 1


def test_text_heatmap_pools_long_sequences():
    n = 100
    text = terminal.text_heatmap(torch.eye(n), [f"t{i}" for i in range(n)], max_size=25)
    rows = text.splitlines()[1:]
    assert len(rows) == 25 and all(len(r.split("|")[1]) == 25 for r in rows)
    assert rows[1].split("|")[1][1] == "█"  # the diagonal survives max-pooling
    assert "max over 4x4 blocks" in text.splitlines()[0]


def test_strongest_heads_prefers_a_previous_token_head(patterns):
    prev = torch.zeros(N_TOKENS, N_TOKENS)
    prev[0, 0] = 1
    prev[torch.arange(1, N_TOKENS), torch.arange(N_TOKENS - 1)] = 1.0
    patterns.pattern[1, 0, 2] = prev
    assert terminal.strongest_heads(patterns, k=1)[0][:2] == (1, 2)


def test_score_table(scores):
    text = terminal.score_table(
        scores, names=["induction"], sort_by="induction", top=2, stderr=True
    )
    lines = text.splitlines()
    assert lines[0].split() == ["unit", "layer", "head", "induction", "induction_stderr"]
    assert len(lines) == 3
    best = scores.top("induction", k=1)[0]
    assert lines[1].split()[0] == f"L{best[0]}H{best[1]}"
    with pytest.raises(ValueError, match="induction"):
        terminal.score_table(scores, names=["nope"])


# ------------------------------------------------------------------------------ CircuitsVis views


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a name or open a connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_circuitsvis_views_never_touch_the_network(patterns, scores, no_network):
    from circuitsvis.utils.render import RenderedHTML

    views = [
        notebook.heads_of_layer(patterns, 1),
        notebook.heads_of_layer(patterns, 0, heads=[2]),
        notebook.chosen_heads(patterns, ["L0H1", (2, 0)]),
        notebook.top_heads(patterns, scores, "induction", k=2),
        notebook.patterns_of_layer(patterns, 2),
    ]
    for view in views:
        assert isinstance(view, RenderedHTML)  # CircuitsVis's own type, displays inline in Jupyter
        assert view._repr_html_() == view.local_src == view.__html__() == str(view)
        assert "unpkg.com" not in view.local_src and "var CircuitsVis=" in view.local_src
    assert no_network == []
    # the control: CircuitsVis's own display would have tried to reach the network
    RenderedHTML(views[0].local_src, views[0].cdn_src)._repr_html_()
    assert no_network


def test_circuitsvis_views_match_circuitsvis_for_plain_tokens(patterns, monkeypatch):
    """Snapshot: with the random div id pinned and nothing to escape, the view is byte-for-byte what
    circuitsvis.attention.attention_heads renders."""
    import circuitsvis.attention
    import circuitsvis.utils.render

    pinned = uuid.UUID("12345678-1234-5678-1234-567812345678")
    monkeypatch.setattr(circuitsvis.utils.render, "uuid4", lambda: pinned)
    plain = causal_patterns(tokens=["BOS", " The", " cat", " sat"])
    ours = notebook.heads_of_layer(plain, 1)
    theirs = circuitsvis.attention.attention_heads(
        plain.layer(1).float(), plain.str_tokens[0], attention_head_names=["L1H0", "L1H1", "L1H2"]
    )
    assert ours.local_src == theirs.local_src and ours.cdn_src == theirs.cdn_src
    assert '<div id="circuits-vis-12345678-1234"' in ours.local_src


def test_circuitsvis_views_escape_script_breakouts():
    evil = [
        "<s>",
        "</script><script>document.title='pwned'</script>",
        "<img src=x onerror=alert(1)>",
    ]
    patterns = causal_patterns(tokens=evil)
    for view in [notebook.heads_of_layer(patterns, 0), notebook.patterns_of_layer(patterns, 0)]:
        props = view.local_src.rsplit("CircuitsVis.render(", 1)[1]
        assert "</script><script>" not in props and "<img" not in props
        assert view.local_src.count("</script>") == 1  # only the view's own closing tag
    # the token-by-token view inserts tokens as HTML, so they arrive HTML-escaped
    assert "\\u0026lt;img src=x" in notebook.patterns_of_layer(patterns, 0).local_src


def test_circuitsvis_views_validate_heads(patterns, scores):
    with pytest.raises(ValueError, match="layers 0..2"):
        notebook.chosen_heads(patterns, ["L5H0"])
    with pytest.raises(ValueError, match="not captured"):
        notebook.chosen_heads(causal_patterns(n_layers=2, layers=[0, 2]), ["L1H0"])
    with pytest.raises(ValueError, match="no score named"):
        notebook.top_heads(patterns, scores, "copying")
