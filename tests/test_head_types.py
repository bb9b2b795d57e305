"""The literature's head types (issue #26) against independent measurements written with
transformers alone (``head_type_references.py``): the effective embedding and OV rows, the copying
and copy-suppression rank tests, the succession score, previous-n attention; their labels' precision
and recall on the bundled model and (``real``) on SmolLM2-135M.
"""

import pytest
import torch
from head_type_references import (
    effective_embedding as hf_effective_embedding,
)
from head_type_references import (
    load_hf,
    name_mover_scores,
    offset_attention,
    ov_rank_shares,
    random_tokens,
    retrieval_scores,
    successor_scores,
)
from head_type_references import (
    ov_logits as hf_ov_logits,
)

from lens_attn.loading import load_model
from lens_attn.probes import natural_prompts
from lens_attn.scoring.ov_circuit import OVRank, Successor, effective_embedding, ov_logits
from lens_attn.scoring.results import DEFAULT_THRESHOLDS
from lens_attn.scoring.runner import score_heads

BUNDLED = "lens_attn/data/tiny-llama-2"


def _heads(grid: torch.Tensor, threshold: float) -> set[tuple[int, int]]:
    return {tuple(h) for h in torch.nonzero(grid >= threshold).tolist()}


def _precision_recall(ours: set, truth: set) -> tuple[float, float]:
    hit = len(ours & truth)
    return (hit / len(ours) if ours else 1.0), (hit / len(truth) if truth else 1.0)


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def bundled(request):
    from lens_attn.compat import HAS_HOOKED

    if request.param == "hooked" and not HAS_HOOKED:
        pytest.skip("HookedTransformer needs TransformerLens 3.9")
    return load_model(BUNDLED, device="cpu", backend=request.param)


@pytest.fixture(scope="module")
def bundled_hf():
    return load_hf(BUNDLED)


def test_ov_rows_match_transformers_on_random_checkpoints(tiny_checkpoints):
    # MHA and GQA random checkpoints: the effective embedding is the same residual (float32
    # rounding: 1e-5); a head's OV row equals transformers' up to a constant per row
    # (center_unembed subtracts W_U's mean over the vocabulary), so rows are compared centred
    for kind, ckpt in tiny_checkpoints.items():
        model = load_model(ckpt.path, device="cpu")
        ids = torch.tensor([5, 17, 200, 399])
        ours = effective_embedding(model, ids)
        theirs = hf_effective_embedding(ckpt.hf_model, ids)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        for layer in range(model.cfg.n_layers):
            rows = ov_logits(model, layer, ours)
            for head in range(model.cfg.n_heads):
                ref = hf_ov_logits(ckpt.hf_model, layer, head, theirs)
                a = rows[head] - rows[head].mean(-1, keepdim=True)
                b = ref - ref.mean(-1, keepdim=True)
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4), (kind, layer, head)


def test_rank_scores_on_hand_built_circuits(tiny_model):
    # Head 0 of layer 1 writes o_t = ln1(e_t) W_V W_O for token t (e_t: the residual after layer 0
    # on [t], read here with a plain TransformerLens hook); setting W_U's column t to o_t / |o_t|
    # makes token t the top logit of its own row (Cauchy-Schwarz), for every token. Head 1 shares
    # the key/value head and writes -o_t: token t is the bottom. ln_final's weight is set to ones
    # so that it is the identity on both backends.
    model = tiny_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for weight in model.ln_final.parameters():
                weight.fill_(1.0)
            attn = model.blocks[1].attn
            attn.W_O[1] = -attn.W_O[0]
            ids = torch.arange(model.cfg.d_vocab)
            _, cache = model.run_with_cache(ids[:, None], names_filter="blocks.0.hook_resid_post")
            x = model.blocks[1].ln1(cache["blocks.0.hook_resid_post"][:, 0])
            w_v = attn.W_V[0]  # [d_model, d_head] (the key/value head of query heads 0 and 1)
            out = x @ w_v @ attn.W_O[0]  # [d_vocab, d_model]
            model.unembed.W_U.copy_((out / out.norm(dim=-1, keepdim=True)).T)
        scores = score_heads(model, ["a b"], scores=["copy_rank"], progress=False)
        copy, suppress = scores["copy_rank"][1], scores["suppress_rank"][1]
        assert copy[0] == 1.0 and suppress[0] == 0.0, (copy, suppress)
        assert suppress[1] == 1.0 and copy[1] == 0.0, (copy, suppress)
    finally:
        model.load_state_dict(state)


def test_copying_labels_match_the_rank_test_on_the_bundled_model(bundled, bundled_hf):
    # the independent rank test: 400 other random tokens, exact ranks over the whole vocabulary
    # (2048 words); lens-attn samples 256 tokens, so shares differ by sampling (binomial stderr
    # <= 0.03); precision and recall of the label against the reference's >= 0.1 must be >= 0.8
    hf, tok = bundled_hf
    ref = ov_rank_shares(hf, random_tokens(hf, tok, 400, seed=1))
    ours = OVRank().from_weights(bundled)
    for label, score, truth in (
        ("copying", "copy_rank", ref["copy"]),
        ("copy_suppression", "suppress_rank", ref["suppress"]),
    ):
        threshold = DEFAULT_THRESHOLDS[label]
        labelled, positives = _heads(ours[score][0], threshold), _heads(truth, threshold)
        precision, recall = _precision_recall(labelled, positives)
        assert precision >= 0.8 and recall >= 0.8, (label, sorted(labelled), sorted(positives))
        assert (ours[score][0] - truth).abs().max() < 0.12  # same shares up to sampling
    assert len(_heads(ref["copy"], 0.1)) == 8  # layer 1's heads copy (the model has them)


def test_successor_score_equals_gould_et_al_formula(bundled, bundled_hf):
    # the same tokens and the same formula, computed independently: equal up to float ties
    hf, tok = bundled_hf
    ours = Successor().from_weights(bundled)["successor"][0]
    torch.testing.assert_close(ours, successor_scores(hf, tok), atol=1e-6, rtol=0)
    assert not _heads(ours, DEFAULT_THRESHOLDS["successor"])  # the bundled model has none


def test_previous_n_matches_transformers_attentions(bundled, bundled_hf):
    # the same BOS-prefixed token ids through transformers' eager attentions: the pooled mean at
    # each offset 2..8, maximised over offsets; float32 attentions, sums over ~40 rows: 1e-5
    hf, _ = bundled_hf
    texts = natural_prompts()[:6]
    tokens = [bundled.to_tokens(t)[0][:64] for t in texts]
    ours = score_heads(bundled, torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)[:1],
                       scores=["previous_n"], progress=False)  # fmt: skip
    ref = offset_attention(hf, tokens[:1])
    best, offset = ref.max(0)
    torch.testing.assert_close(ours["previous_n"], best, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["previous_n_offset"], (offset + 2).float(), atol=0, rtol=0)


@pytest.mark.real
def test_copying_labels_match_the_rank_test_on_smollm2(smollm2, smollm2_path):
    # SmolLM2's copiers and copy suppressors sit in layers 22-24 (the full 270-head table is in
    # experiments/taxonomy.md); the exact whole-vocabulary reference on 200 tokens for layers 22-24
    # (27 heads, ~5 TFLOP less than all 270) keeps this test under a minute. lens-attn ranks each token among a random tenth of
    # the vocabulary (ov_circuit's docstring), so shares differ by more than sampling alone.
    hf, tok = load_hf(smollm2_path)
    heads = [(layer, head) for layer in range(22, 25) for head in range(9)]
    ref = ov_rank_shares(hf, random_tokens(hf, tok, 200, seed=1), heads=heads)
    ours = OVRank().from_weights(smollm2)
    for label, score, truth in (
        ("copying", "copy_rank", ref["copy"]),
        ("copy_suppression", "suppress_rank", ref["suppress"]),
    ):
        threshold = DEFAULT_THRESHOLDS[label]
        inside = torch.zeros_like(truth, dtype=torch.bool)
        inside[22:25] = True
        labelled = _heads(ours[score][0].masked_fill(~inside, 0), threshold)
        positives = _heads(truth.nan_to_num(0), threshold)
        precision, recall = _precision_recall(labelled, positives)
        assert precision >= 0.8 and recall >= 0.8, (label, sorted(labelled), sorted(positives))
        assert len(positives) >= 2, (label, sorted(positives))  # SmolLM2 has both kinds


def _ioi_like_probes(model, n: int = 6, seed: int = 0) -> list:
    # token sequences with an answer pair (IO once, S twice) on any vocabulary: the formula is
    # defined for them whether or not the model can do IOI (the bundled model has no name tokens)
    from lens_attn.probes import Probe, _random_ids

    g = torch.Generator().manual_seed(seed)
    pool = _random_ids(model)
    probes = []
    for _ in range(n):
        io, s, *rest = pool[torch.randperm(len(pool), generator=g)[:9]].tolist()
        tokens = [1, *rest[:2], io, rest[2], s, *rest[3:5], s, rest[5], rest[6]]
        probes.append(Probe("ioi", torch.tensor(tokens), answers=(io, s)))
    return probes


def test_name_mover_scores_match_transformers(bundled, bundled_hf):
    # the same prompts through transformers' attentions and o_proj inputs: sums of a few float32
    # products per prompt, 1e-5
    hf, _ = bundled_hf
    probes = _ioi_like_probes(bundled)
    ours = score_heads(bundled, probes, scores=["name_mover"], progress=False)
    ref = name_mover_scores(hf, [(p.tokens, *p.answers) for p in probes])
    for name in ("name_mover", "negative_name_mover"):
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=0)
    # on probes without answers the scores are NaN, not 0
    plain = score_heads(bundled, ["a b c"], scores=["name_mover"], progress=False)
    assert torch.isnan(plain["name_mover"]).all()


@pytest.mark.real
def test_name_movers_on_smollm2(smollm2, smollm2_path):
    # SmolLM2 does IOI (85% of discover's 48 sentences put IO above S, measured with the
    # reference); its name movers by the reference on 16 sentences equal lens-attn's to 1e-5
    from lens_attn.probes import ioi_probes

    hf, _ = load_hf(smollm2_path)
    probes = ioi_probes(smollm2, n=16)
    ours = score_heads(smollm2, probes, scores=["name_mover"], progress=False)
    ref = name_mover_scores(hf, [(p.tokens, *p.answers) for p in probes])
    assert ref["accuracy"] >= 0.7
    torch.testing.assert_close(ours["name_mover"], ref["name_mover"], atol=1e-5, rtol=0)
    assert _heads(ours["name_mover"], DEFAULT_THRESHOLDS["name_mover"])  # it has name movers


def _needle_starts(probe) -> tuple:
    # the needle positions found by plain search (the probe only records the second's start)
    second = probe.period + 1
    needle = probe.tokens[second:]
    first = next(j for j in range(second) if torch.equal(probe.tokens[j : j + len(needle)], needle))
    return probe.tokens, first, second


def test_retrieval_matches_transformers_on_the_bundled_model(bundled, bundled_hf):
    # argmax of float32 attention rows, the same tokens: equal shares (1e-6: means of 0/1 hits).
    # The bundled model copies needles with its layer-1 induction heads (8 of 32 heads >= 0.1)
    from lens_attn.probes import retrieval_probes

    hf, _ = bundled_hf
    probes = retrieval_probes(bundled)
    ours = score_heads(bundled, probes, scores=["retrieval"], progress=False)["retrieval"]
    ref = retrieval_scores(hf, [_needle_starts(p) for p in probes])
    torch.testing.assert_close(ours, ref["retrieval"], atol=1e-6, rtol=0)
    assert _heads(ours, DEFAULT_THRESHOLDS["retrieval"]) == {(1, h) for h in range(8)}
