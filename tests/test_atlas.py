"""Tests for lens_attn.atlas: the streaming pass against brute force written with plain
TransformerLens hooks, the HeadAtlas contract, determinism, corpus reading, and (``real``) SmolLM2's
induction heads on planted repeated spans.

Brute force here: each window's per-head residual writes from ``hook_result``
(``use_attn_result=True``: TransformerLens's own per-head ``z W_O``), their norms kept for every
position, sorted. It shares no code with lens_attn.atlases.
"""

import json

import pytest
import torch
from transformer_lens.utilities import get_act_name

import lens_attn
from lens_attn.atlases.corpus import default_corpus, read_corpus
from lens_attn.errors import InputError

TEXTS = [
    "The cat sat on the mat. The cat sat on the mat, and the dog lay by the door.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "A function is defined with the def keyword, followed by its name and a list of parameters "
    "in parentheses. The body of the function is indented. A function is defined with the def "
    "keyword, followed by its name.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def bundled():
    return lens_attn.load_model(device="cpu")


def brute_force(model, texts, window):
    """Every (layer, head, doc, query_pos) activation, with windows cut as documented: the first
    ``window`` tokens, then BOS + the next ``window - 1`` tokens, and so on; position 0 of a
    window is not recorded."""
    bos = model.tokenizer.bos_token_id
    rows = []
    old = model.cfg.use_attn_result
    model.set_use_attn_result(True)
    try:
        for doc, text in enumerate(texts):
            tokens = model.to_tokens(text, truncate=False)[0]
            pieces = [(0, 0, tokens[:window])]
            for begin in range(window, len(tokens), window - 1):
                chunk = torch.cat([torch.tensor([bos]), tokens[begin : begin + window - 1]])
                pieces.append((begin, 1, chunk))
            for begin, offset, chunk in pieces:
                names = [get_act_name("result", layer) for layer in range(model.cfg.n_layers)]
                with torch.no_grad():
                    _, cache = model.run_with_cache(chunk[None], names_filter=names)
                for layer, name in enumerate(names):
                    norms = cache[name][0].norm(dim=-1)  # [pos, head_index]
                    for pos in range(1, len(chunk)):
                        for head in range(model.cfg.n_heads):
                            rows.append((layer, head, doc, begin + pos - offset,
                                         float(norms[pos, head])))  # fmt: skip
    finally:
        model.set_use_attn_result(old)
    return rows


def check_top_examples(model, head_atlas, rows, k):
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            everything = sorted((r for r in rows if r[0] == layer and r[1] == head),
                                key=lambda r: -r[4])  # fmt: skip
            table = head_atlas.top_examples((layer, head), k)
            assert len(table) == min(k, len(everything))
            # values: equal up to float32 rounding of two ways to compute a norm (Gram vs direct)
            expected = torch.tensor([r[4] for r in everything[:k]], dtype=torch.float64)
            assert torch.allclose(torch.tensor(table["activation"].to_numpy(), dtype=torch.float64), expected,
                                  rtol=1e-4, atol=1e-5)  # fmt: skip
            # positions: each kept one has that activation in the brute force (ties may swap)
            lookup = {(r[2], r[3]): r[4] for r in everything}
            for doc, pos, act in table[["doc", "query_pos", "activation"]].itertuples(index=False):
                assert lookup[(doc, pos)] == pytest.approx(act, rel=1e-4, abs=1e-5)


def test_top_examples_equal_brute_force_on_the_bundled_model(bundled):
    window = 24  # shorter than the texts: windows after the first start with an added BOS
    head_atlas = lens_attn.atlas(bundled, TEXTS, k=7, window=window, batch_size=3,
                                 circuits=False, probes=False, progress=False)  # fmt: skip
    rows = brute_force(bundled, TEXTS, window)
    check_top_examples(bundled, head_atlas, rows, 7)
    # every recorded position counted once per head
    assert int(head_atlas.metrics["count"][0, 0]) == sum(1 for r in rows if r[:2] == (0, 0))


def test_contract_head_names_columns_and_query_positions(bundled):
    head_atlas = lens_attn.atlas(bundled, TEXTS, k=5, progress=False)
    by_name, by_tuple = head_atlas.top_examples("L1H5", 3), head_atlas.top_examples((1, 5), 3)
    assert by_name.equals(by_tuple)
    assert {"doc", "query_pos", "activation"} <= set(by_name.columns) and len(by_name) == 3
    assert list(by_name["activation"]) == sorted(by_name["activation"], reverse=True)
    for row in by_name.itertuples():
        # query_pos indexes model.to_tokens(text), BOS included
        tokens = bundled.to_tokens(TEXTS[row.doc])[0]
        assert lens_attn.probes.str_tokens(bundled, tokens[row.query_pos : row.query_pos + 1]) == [
            row.query_token
        ]
        assert row.context[row.context_query] == row.query_token
    table = head_atlas.to_dataframe()
    assert len(table) == bundled.cfg.n_layers * bundled.cfg.n_heads
    assert {"layer", "head", "entropy", "bos", "previous", "induction"} <= set(table.columns)
    with pytest.raises(ValueError, match="valid layers 0..3"):
        head_atlas.top_examples("L9H9")


def test_metrics_equal_the_patterns_of_plain_run_with_cache(bundled):
    """Entropy, distance and shares recomputed from full cached patterns, per head."""
    head_atlas = lens_attn.atlas(bundled, TEXTS, k=3, circuits=False, pca=False, probes=False,
                                 progress=False)  # fmt: skip
    sums = {}
    count = 0
    for text in TEXTS:
        tokens = bundled.to_tokens(text)[0]
        _, cache = bundled.run_with_cache(tokens[None], names_filter=lambda n: "pattern" in n)
        n = len(tokens)
        for q in range(1, n):
            count += 1
            for layer in range(bundled.cfg.n_layers):
                row = cache[get_act_name("pattern", layer)][0, :, q, : q + 1]  # [head, key]
                ind = [k for k in range(2, q) if tokens[k - 1] == tokens[q]]
                dup = [k for k in range(1, q) if tokens[k] == tokens[q]]
                values = {
                    "entropy": -(row * row.clamp(min=1e-30).log()).sum(-1),
                    "distance": (row * (q - torch.arange(q + 1))).sum(-1),
                    "bos": row[:, 0], "previous": row[:, q - 1], "self": row[:, q],
                }  # fmt: skip
                for name, v in values.items():
                    sums[(name, layer)] = sums.get((name, layer), 0) + v
                for name, keys in (("induction", ind), ("duplicate", dup)):
                    if keys:
                        sums[(name, layer)] = sums.get((name, layer), 0) + row[:, keys].sum(-1)
                        sums[(name, "rows", layer)] = sums.get((name, "rows", layer), 0) + 1
    for layer in range(bundled.cfg.n_layers):
        for name in ("entropy", "distance", "bos", "previous", "self"):
            # float32 sums over ~80 rows in two orders: 1e-4 relative
            assert torch.allclose(head_atlas.metrics[name][layer], sums[(name, layer)] / count,
                                  rtol=1e-4, atol=1e-5), name  # fmt: skip
        for name in ("induction", "duplicate"):
            expected = sums[(name, layer)] / sums[(name, "rows", layer)]
            assert torch.allclose(head_atlas.metrics[name][layer], expected, rtol=1e-4,
                                  atol=1e-5), name  # fmt: skip


def test_same_atlas_whatever_the_batching_and_seeded_samples(bundled):
    kwargs = dict(k=4, per_decile=2, circuits=False, pca=False, probes=False, progress=False)
    one = lens_attn.atlas(bundled, TEXTS, batch_size=1, **kwargs)
    many = lens_attn.atlas(bundled, TEXTS, batch_size=4, **kwargs)
    columns = ["doc", "query_pos"]
    for head in ("L0H0", "L1H5", "L3H7"):
        assert one.top_examples(head)[columns].equals(many.top_examples(head)[columns])
        assert one.decile_examples(head)[columns].equals(many.decile_examples(head)[columns])
    other = lens_attn.atlas(bundled, TEXTS, batch_size=4, seed=1, **kwargs)
    differs = [not other.decile_examples(h)[columns].equals(many.decile_examples(h)[columns])
               for h in ("L0H0", "L1H5", "L3H7")]  # fmt: skip
    assert any(differs)  # a different seed samples different positions
    deciles = many.decile_examples("L1H5")
    assert set(deciles["decile"]) <= set(range(10)) and len(deciles) > 0
    assert (deciles.groupby("decile").size() <= 2).all()


def test_sample_look_ahead_keeps_the_same_sample(bundled, monkeypatch):
    """A buffer's sample candidates are pruned to those that survive the whole buffer
    (``reduce.sample_floor``); with one batch per buffer nothing can be pruned. Both keep the same
    sample, field by field (attended keys and ``z`` included), and the look-ahead gathers fewer
    candidates."""
    from lens_attn.atlases import runner
    from lens_attn.atlases.reduce import AtlasState, ReduceConfig

    widths = []

    class Counting(runner.BatchPass):
        def __init__(self, *args):
            super().__init__(*args)
            widths.append(int(torch.isfinite(self.sample_rank).sum()))

    monkeypatch.setattr(runner, "BatchPass", Counting)
    texts = default_corpus()[:40]  # about 150 windows of 64 tokens: two buffers of 64 batches
    config = ReduceConfig(k=3, n_keys=3, before=2, after=1, sample_size=30)
    samples, gathered = [], []
    for buffer in (runner.BUFFER, 1):
        monkeypatch.setattr(runner, "BUFFER", buffer)
        state = AtlasState(bundled.cfg.n_layers, bundled.cfg.n_heads, config)
        runner._stream(bundled, texts, 64, 1, state, config, 0, None, False)
        samples.append(state.sample.sorted())
        gathered.append(sum(widths))
        widths.clear()
    pruned, whole = samples
    assert gathered[0] < gathered[1] / 2
    assert torch.isfinite(pruned.rank).all()  # full: every head kept 30 positions
    assert torch.equal(pruned.rank, whole.rank)
    for name, value in whole.fields.items():
        assert torch.equal(pruned.fields[name], value), name


def test_circuit_tables_pca_and_probe_patterns(bundled):
    head_atlas = lens_attn.atlas(bundled, TEXTS, k=5, progress=False)
    ov = head_atlas.ov["L1H5"]
    assert ov and len(ov[0]["top"]) == 5 and all(isinstance(t, str) for t, _ in ov[0]["top"])
    qk = head_atlas.qk["L1H5"]
    assert [row["score"] for row in qk] == sorted((row["score"] for row in qk), reverse=True)
    pca = head_atlas.pca["L1H5"]
    assert len(pca["coords"]) == len(pca["activation"]) and 0 < sum(pca["explained"]) <= 1 + 1e-6
    probe = head_atlas.probes[0]
    n = len(probe["tokens"])
    assert probe["pattern"].shape == (bundled.cfg.n_layers, bundled.cfg.n_heads, n, n)


def test_bad_arguments_say_what_is_valid(bundled):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        lens_attn.atlas(bundled, TEXTS, k=0)
    with pytest.raises(ValueError, match="window must be an integer in 2..128"):
        lens_attn.atlas(bundled, TEXTS, window=1000)
    with pytest.raises(InputError, match="not one string"):
        lens_attn.atlas(bundled, "one text")


def test_read_corpus_accepts_text_folders_jsonl_and_datasets(tmp_path):
    (tmp_path / "one.txt").write_text("first text")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert list(read_corpus(tmp_path / "one.txt")) == ["first text"]
    assert list(read_corpus(folder)) == ["first", "second"]
    assert list(read_corpus(lines)) == ["x", "y"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match="line 1 has no string field 'text'"):
        list(read_corpus(bad))
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no .txt files"):
        read_corpus(empty)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["p", "q"]}).save_to_disk(str(tmp_path / "saved"))
    assert list(read_corpus(tmp_path / "saved")) == ["p", "q"]


def test_default_corpus_is_seeded_and_plants_repeated_spans():
    texts = default_corpus()
    assert texts == default_corpus() and texts != default_corpus(seed=1)
    repeated = texts[-1]
    assert repeated.endswith(" " + repeated.split(". ")[-1])  # the last sentence occurred before
    assert sum(len(t) for t in texts) > 100_000


# ----------------------------------------------------------------------------------- real model

INDUCTION_HEADS = ("L17H3", "L17H4", "L18H6", "L18H7")


WORDS = (
    "river garden silver window market pencil thunder orange castle winter engine violet basket "
    "harbor candle forest ladder meadow pepper rocket saddle tunnel velvet wagon anchor blanket "
    "cotton dragon feather glacier hammer island jacket kettle lemon marble needle pillow"
).split()


def planted_corpus(n=8, span=10, seed=0):
    """Sentences with a span of distinct words repeated later: induction heads should fire on the
    second copy (its first copy repeats no token, so nothing there has an induction target)."""
    import random

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        chunk = " ".join(rng.sample(WORDS, span))
        texts.append(f"The note said {chunk}. Later someone read it aloud: {chunk}.")
    return texts


def second_copy_share(model, head_atlas, texts, head, k):
    """The share of the head's top-k examples whose query sits in the second copy."""
    table = head_atlas.top_examples(head, k)
    on_second = 0
    for row in table.itertuples():
        split = len(model.to_tokens(texts[row.doc].split(": ")[0])[0])
        on_second += row.query_pos >= split
    return on_second / len(table)


@pytest.mark.real
def test_top_examples_equal_brute_force_on_smollm2(smollm2):
    texts = TEXTS[:2]
    head_atlas = lens_attn.atlas(smollm2, texts, k=4, circuits=False, pca=False, probes=False,
                                 progress=False)  # fmt: skip
    check_top_examples(smollm2, head_atlas, brute_force(smollm2, texts, 10_000), 4)


@pytest.mark.real
def test_smollm2_induction_heads_fire_on_second_copies(smollm2):
    texts = planted_corpus()
    head_atlas = lens_attn.atlas(smollm2, texts, k=10, circuits=False, pca=False, probes=False,
                                 progress=False)  # fmt: skip
    # SmolLM2's strongest induction heads (scores on repeated random tokens; experiments/atlas.md)
    for head in INDUCTION_HEADS:
        assert second_copy_share(smollm2, head_atlas, texts, head, 10) >= 0.9, head
    # a control: second copies are not where every head fires (layers 0-5: 0.23 measured)
    early = [f"L{layer}H{head}" for layer in range(6) for head in range(smollm2.cfg.n_heads)]
    shares = [second_copy_share(smollm2, head_atlas, texts, h, 10) for h in early]
    assert sum(shares) / len(shares) < 0.5
