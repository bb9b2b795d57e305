"""Head scores against independent references: TransformerLens's ``detect_head``, hand-built patterns
with known scores, invariants of the streaming pass, and the bundled checkpoint's known heads."""

import pytest
import torch
from transformer_lens.head_detector import detect_head
from transformer_lens.utilities import get_act_name

import lens_attn
from lens_attn.loading import BUNDLED_CHECKPOINT, load_model
from lens_attn.probes import Probe
from lens_attn.scoring.builtin import BUILTIN_SCORES
from lens_attn.scoring.protocol import DetectionPattern, PromptRatio
from lens_attn.scoring.registry import register_analysis, unregister_analysis
from lens_attn.scoring.results import HeadScores
from lens_attn.scoring.runner import score_heads

ORACLE_PROMPTS = [
    "the cat sat on the mat and the cat sat on the mat",
    "one two three four one two three four five",
    "When Mary and John went to the store, John gave a drink to Mary",
]
TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {kind: load_model(ckpt.path, device="cpu") for kind, ckpt in tiny_checkpoints.items()}


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("prompt", ORACLE_PROMPTS, ids=["cat", "count", "ioi"])
def test_all_rows_equals_detect_head(models, kind, prompt):
    model = models[kind]
    ours = score_heads(model, [prompt], scores=list(TL_NAMES), normalize="all_rows", progress=False)
    for name, tl_name in TL_NAMES.items():
        reference = detect_head(model, prompt, tl_name, error_measure="mul")
        # both are float32 sums over at most 20x20 weights: 1e-5 leaves room for summation order only
        torch.testing.assert_close(ours[name], reference.float(), atol=1e-5, rtol=0)


def _force_pattern(layer: int, head: int, make):
    """A hook that replaces one head's pattern with ``make(n)`` ([query_pos, key_pos]), out of place."""

    def hook(pattern, hook):
        forced = pattern.clone()
        forced[:, head] = make(pattern.shape[-1]).to(pattern)
        return forced

    return (get_act_name("pattern", layer), hook)


def _previous_token_pattern(n):
    p = torch.zeros(n, n)
    p[0, 0] = 1
    p[torch.arange(1, n), torch.arange(n - 1)] = 1
    return p


def _uniform_pattern(n):
    return torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]


def test_perfect_previous_token_head_scores_one(tiny_model):
    with tiny_model.hooks(fwd_hooks=[_force_pattern(1, 4, _previous_token_pattern)]):
        scores = score_heads(tiny_model, ORACLE_PROMPTS, progress=False)
    assert scores["previous_token"][1, 4].item() == pytest.approx(1.0, abs=1e-6)
    assert scores["offset"][1, 4].item() == 1 and scores["offset_share"][1, 4].item() == 1
    assert scores["confidence"][1, 4].item() == pytest.approx(1.0, abs=1e-6)
    assert scores["mean_distance"][1, 4].item() == pytest.approx(1.0, abs=1e-6)
    # other heads are untouched by the forcing hook
    assert scores["previous_token"][1, 3].item() < 0.99


def test_uniform_pattern_has_analytic_entropy_and_confidence(tiny_model):
    prompt = "one two three four five six seven"
    n = tiny_model.to_tokens(prompt).shape[1]
    with tiny_model.hooks(fwd_hooks=[_force_pattern(0, 2, _uniform_pattern)]):
        scores = score_heads(tiny_model, [prompt], progress=False)
    rows = range(1, n)  # rows with a choice
    assert scores["entropy"][0, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert scores["confidence"][0, 2].item() == pytest.approx(
        sum(1 / (q + 1) for q in rows) / len(rows), abs=1e-6
    )
    assert scores["mean_distance"][0, 2].item() == pytest.approx(
        sum(q / 2 for q in rows) / len(rows), abs=1e-5
    )
    assert scores["bos"][0, 2].item() == pytest.approx(
        sum(1 / (q + 1) for q in rows) / len(rows), abs=1e-6
    )


def test_padding_counts_nowhere(tiny_model):
    # one batch of three padded prompts == three batches of one: padded queries/keys add nothing
    together = score_heads(tiny_model, ORACLE_PROMPTS, batch_size=3, progress=False)
    alone = score_heads(tiny_model, ORACLE_PROMPTS, batch_size=1, progress=False)
    for name in together.names:
        torch.testing.assert_close(together[name], alone[name], atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(
            together.stderr[name], alone.stderr[name], atol=1e-5, rtol=0, equal_nan=True
        )


def test_builtin_probes_every_score_in_range(tiny_model):
    scores = score_heads(tiny_model, progress=False)
    assert scores.names == BUILTIN_SCORES[:9] + [
        "offset", "offset_share", "previous_n", "previous_n_offset",
        "copying", "copy_rank", "suppress_rank", "successor",
        "name_mover", "negative_name_mover", "retrieval",
    ]  # fmt: skip
    for name in [
        "previous_token",
        "current_token",
        "duplicate_token",
        "induction",
        "bos",
        "confidence",
        "sparsity",
        "offset_share",
    ]:
        assert ((scores[name] >= -1e-6) & (scores[name] <= 1 + 1e-6)).all(), name
    assert ((scores["copying"] >= -1 - 1e-6) & (scores["copying"] <= 1 + 1e-6)).all()
    assert (scores.stderr["induction"] > 0).all()
    df = scores.to_dataframe()
    assert list(df.columns[:3]) == ["layer", "head", "unit"] and len(df) == 3 * 6


def test_copying_sign_on_hand_built_circuits(tiny_model):
    # W_O = W_V^T and W_U = W_E^T make the OV circuit (W_E W_V)(W_E W_V)^T: positive semi-definite -> +1
    model = tiny_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            w_v = model.blocks[0].attn.W_V[0]  # [d_model, d_head] (key/value head 0)
            model.blocks[0].attn.W_O[0] = w_v.T
            model.blocks[0].attn.W_O[1] = -w_v.T  # head 1 shares key/value head 0 -> -1
            model.unembed.W_U.copy_(model.embed.W_E.T)
        scores = score_heads(model, ["a b"], scores=["copying"], progress=False)
        assert scores["copying"][0, 0].item() == pytest.approx(1.0, abs=1e-4)
        assert scores["copying"][0, 1].item() == pytest.approx(-1.0, abs=1e-4)
    finally:
        model.load_state_dict(state)


def test_custom_analysis_runs_in_the_same_forward_pass(tiny_model):
    @register_analysis("test_punctuation", hooks=("pattern", "z"))
    def punctuation(layer, acts, batch):
        pattern = acts["pattern"]
        assert acts["z"].shape[2] == tiny_model.cfg.n_heads  # [batch, pos, head_index, d_head]
        punct = torch.tensor(
            [
                [t.strip() in {",", "."} for t in batch.str_tokens(i)]
                + [False] * (batch.tokens.shape[1] - int(batch.mask[i].sum()))
                for i in range(len(batch.tokens))
            ]
        )
        mass = (pattern * punct[:, None, None, :]).sum(-1)
        rows = batch.mask.float()
        return PromptRatio((mass * rows[:, None]).sum(-1), rows.sum(-1)[:, None])

    forward_passes = []
    embed_hook = ("hook_embed", lambda act, hook: forward_passes.append(1))
    try:
        with tiny_model.hooks(fwd_hooks=[embed_hook]):
            scores = score_heads(
                tiny_model,
                ORACLE_PROMPTS,
                scores=["test_punctuation", "induction"],
                batch_size=8,
                progress=False,
            )
        assert len(forward_passes) == 1
        assert scores.names == ["test_punctuation", "induction"]
        assert scores["test_punctuation"].max() > 0
        with pytest.raises(ValueError, match="already registered"):
            register_analysis("test_punctuation")(punctuation)
        with pytest.raises(ValueError, match="already registered"):
            register_analysis("induction")(punctuation)
    finally:
        unregister_analysis("test_punctuation")


def test_detection_pattern_mul_and_abs(tiny_model):
    def previous(tokens):
        return _previous_token_pattern(len(tokens))

    mul = DetectionPattern("my_previous", previous, measure="mul")
    abs_ = DetectionPattern("my_previous_abs", previous, measure="abs")
    prompt = ORACLE_PROMPTS[0]
    scores = score_heads(tiny_model, [prompt], scores=[mul, abs_], progress=False)
    reference = _previous_token_pattern(tiny_model.to_tokens(prompt).shape[1])
    for measure, name in [("mul", "my_previous"), ("abs", "my_previous_abs")]:
        tl = detect_head(tiny_model, prompt, reference, error_measure=measure)
        # detect_head rounds "abs" to 3 decimals
        torch.testing.assert_close(
            scores[name], tl.float(), atol=1e-5 if measure == "mul" else 6e-4, rtol=0
        )


def test_bridge_backend_gives_the_same_scores(tiny_checkpoints, tiny_model):
    bridge = load_model(tiny_checkpoints["gqa"].path, backend="bridge", device="cpu")
    hooked = score_heads(
        tiny_model, ORACLE_PROMPTS, scores=list(TL_NAMES) + ["entropy"], progress=False
    )
    bridged = score_heads(
        bridge, ORACLE_PROMPTS, scores=list(TL_NAMES) + ["entropy"], progress=False
    )
    for name in hooked.names:
        torch.testing.assert_close(bridged[name], hooked[name], atol=1e-4, rtol=0)


def test_save_load_top_classify(tiny_model, tmp_path):
    scores = score_heads(tiny_model, ORACLE_PROMPTS, progress=False)
    scores.save(tmp_path)
    loaded = HeadScores.load(tmp_path)
    for name in scores.names:
        torch.testing.assert_close(loaded[name], scores[name], equal_nan=True)
    assert loaded.provenance["probe_hash"] == scores.provenance["probe_hash"]
    (layer, head, value), *_ = scores.top("previous_token", 3)
    assert value == scores["previous_token"].max().item()
    labels = scores.classify({"previous_token": 0.0})
    assert len(labels.heads_with("previous_token")) == 3 * 6
    with pytest.raises(ValueError, match="unknown label 'indction'"):
        scores.classify({"indction": 0.5})


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: score_heads(m, ["a"], scores=["indction"]),
            "unknown score 'indction'.*valid:.*induction",
        ),
        (lambda m: score_heads(m, []), "prompt list is empty"),
        (lambda m: score_heads(m, [""]), "prompt 0 is empty"),
        (
            lambda m: score_heads(m, [Probe("prompt", torch.ones(65, dtype=torch.long))]),
            "context is n_ctx=64",
        ),
        # under pytest, jaxtyping+beartype check the Literal first; unwrap to reach our own message
        (
            lambda m: getattr(score_heads, "__wrapped__", score_heads)(
                m, ["a b"], normalize="rows"
            ),
            "valid: target_rows, all_rows",
        ),
        (
            lambda m: score_heads(
                m, ["a b"], scores=[DetectionPattern("x", lambda t: torch.ones(len(t), len(t)))]
            ),
            "not lower-triangular",
        ),
        (
            lambda m: score_heads(
                m, ["a b"], scores=[DetectionPattern("x", lambda t: torch.zeros(2, 3))]
            ),
            r"must be \[query_pos, key_pos\]",
        ),
    ],
    ids=[
        "unknown-score",
        "empty-list",
        "empty-prompt",
        "too-long",
        "normalize",
        "upper-tri",
        "shape",
    ],
)
def test_bad_input(tiny_model, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model)


def test_unknown_hook_lists_close_matches(tiny_model):
    @register_analysis("test_bad_hook", hooks=("hook_patern",))
    def bad(layer, acts, batch):
        raise AssertionError("never called")

    try:
        with pytest.raises(ValueError, match="does not exist.*close matches:.*pattern"):
            score_heads(tiny_model, ["a b"], scores=["test_bad_hook"], progress=False)
    finally:
        unregister_analysis("test_bad_hook")


@pytest.mark.skipif(
    not (BUNDLED_CHECKPOINT / "config.json").exists(), reason="bundled checkpoint not built"
)
def test_bundled_checkpoint_induction_head_is_labelled():
    model = lens_attn.load_model()
    scores = score_heads(model, progress=False)
    labels = scores.classify()
    # independent measurement: the head with the largest mean attention from the second copy of
    # [BOS, r, r] to the token after the first occurrence, straight from capture_patterns
    probes = lens_attn.induction_probes(model, periods=(23,), n_per_period=8, seed=123)
    patterns = lens_attn.capture_patterns(model, probes)
    q = torch.arange(24, 47)
    direct = patterns.pattern[:, :, :, q, q - 22].mean(dim=(1, 3))  # [layer, head_index]
    best = divmod(int(direct.argmax()), model.cfg.n_heads)
    assert "induction" in labels.labels[best]
    assert scores.top("induction", 1)[0][:2] == best


def test_streaming_memory_does_not_grow_with_depth():
    from benchmarking import scoring_peak_memory_in_subprocess as peak

    # 8 prompts x 8 heads x 256^2 float32 = 16.8 MB per layer pattern: patterns dominate the peak.
    # Each number comes from a fresh process (peak RSS is only meaningful there).
    one, eight = peak(1), peak(8)
    assert eight <= 1.5 * one, (one, eight)
    # the measurement can see a cache: keeping all 8 layers' patterns costs several times more
    assert peak(8, mode="cache") >= 3 * one, (one, eight)


def test_per_probe_set_scores_round_trip_and_label_reads_its_probes(tmp_path):
    """``score_probe_sets``: each label reads its own probe kind; saved and loaded with the rest."""
    import lens_attn
    from lens_attn.scoring.probe_sets import score_probe_sets
    from lens_attn.scoring.results import LABEL_PROBES, HeadScores

    model = lens_attn.load_model(device="cpu")
    scores = score_probe_sets(model, scores=["induction", "previous_token", "bos"], progress=False)
    assert sorted(scores.per_probe_set) == ["natural", "repeated_random", "repeated_tokens"]
    own = scores.per_probe_set[LABEL_PROBES["induction"]]["induction"]
    torch.testing.assert_close(scores.label_score("induction"), own)
    # the merged grid is the prompt-count-weighted mean of the kinds
    parts = [(s.values["induction"], s.counts["induction"]) for s in scores.per_probe_set.values()]
    total = sum(c for _, c in parts)
    mean = sum(v.nan_to_num() * c for v, c in parts) / total
    torch.testing.assert_close(scores["induction"], mean, rtol=1e-5, atol=1e-6)
    # the bundled induction heads read far higher on repeated random tokens than over every probe
    assert float(own[1].mean()) > float(scores["induction"][1].mean()) + 0.1
    scores.save(tmp_path)
    loaded = HeadScores.load(tmp_path)
    torch.testing.assert_close(loaded.label_score("induction"), own)
    assert loaded.classify().labels == scores.classify().labels
    assert "induction@repeated_random" in (tmp_path / "scores.csv").read_text().splitlines()[0]
