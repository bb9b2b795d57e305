"""A ``TransformerBridge`` (TransformerLens 4's only model; 3.9's ``backend="bridge"``) checked
against values computed on that same model by hand, from its own modules and hooks.

- a zero ablation against zeroing the head's slice of the input to HF's ``o_proj`` (a plain torch
  pre-hook on the transformers module, no TransformerLens hook point): the same float32 forward
  with the same numbers zeroed, so log-probabilities agree to float rounding (1e-5);
- the head scores against sums over ``run_with_cache``'s ``hook_pattern`` written out here (1e-6:
  float32 sums over at most 20 rows).
"""

import pytest
import torch
from transformer_lens.utilities import get_act_name

from lens_attn.ablation import metrics
from lens_attn.ablation.methods import ablate
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.loading import load_model
from lens_attn.scoring.runner import score_heads

PROMPTS = [
    "the cat sat on the mat and the cat sat on the mat",
    "one two three four one two three four five",
]


@pytest.fixture(scope="module")
def bridges(tiny_checkpoints):
    return {
        kind: load_model(ckpt.path, backend="bridge", device="cpu")
        for kind, ckpt in tiny_checkpoints.items()
    }


def _zero_o_proj_input(bridge, layer: int, head: int):
    """A torch pre-hook on layer ``layer``'s HF ``o_proj`` zeroing ``head``'s ``d_head`` inputs."""
    d_head = bridge.cfg.d_head

    def pre_hook(module, args):
        (x,) = args  # [batch, pos, n_heads * d_head], head-major as HF reshapes attn_output
        x = x.clone()
        x[..., head * d_head : (head + 1) * d_head] = 0
        return (x,)

    o_proj = bridge.original_model.model.layers[layer].self_attn.o_proj
    return o_proj.register_forward_pre_hook(pre_hook)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_zero_ablation_equals_zeroing_the_heads_o_proj_input(bridges, kind):
    bridge = bridges[kind]
    tokens = bridge.to_tokens(PROMPTS[0])
    layer, head = 1, bridge.cfg.n_heads - 1
    with torch.no_grad():
        clean = bridge(tokens)
        handle = _zero_o_proj_input(bridge, layer, head)
        try:
            by_hand = bridge(tokens)
        finally:
            handle.remove()
        with ablate(bridge, [(layer, head)], method="zero"):
            ablated = bridge(tokens)
    torch.testing.assert_close(ablated.log_softmax(-1), by_hand.log_softmax(-1), atol=1e-5, rtol=0)
    assert (ablated - clean).abs().max() > 1e-3  # the ablation does something
    # the sweep measures the same thing
    swept = ablation_sweep(bridge, tokens, heads=[(layer, head)], metric="loss")
    expected = metrics.per_prompt("loss", by_hand, tokens)
    torch.testing.assert_close(swept.ablated_per_prompt[0], expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_head_scores_equal_sums_over_the_cached_pattern(bridges, kind):
    bridge = bridges[kind]
    names = ["previous_token", "induction", "bos"]
    ours = score_heads(bridge, PROMPTS, scores=names, normalize="all_rows", progress=False)
    per_prompt = {name: [] for name in names}
    for prompt in PROMPTS:
        tokens = bridge.to_tokens(prompt)[0]
        n = len(tokens)
        _, cache = bridge.run_with_cache(tokens[None])
        q = torch.arange(n)
        earlier = q[None, :] < q[:, None]  # [query_pos, key_pos]: key strictly before the query
        same = tokens[:, None] == tokens[None, :]
        # induction target: key k follows an earlier copy of the query's token (k - 1 < q)
        follows = torch.zeros(n, n, dtype=torch.bool)
        follows[:, 1:] = (same & earlier)[:, :-1]
        for name in names:
            rows = []
            for layer in range(bridge.cfg.n_layers):
                p = cache[get_act_name("pattern", layer)][0].float()  # [head, query, key]
                if name == "previous_token":
                    mass = p[:, q[1:], q[1:] - 1].sum(-1)
                elif name == "induction":
                    mass = (p * follows).sum((-1, -2))
                else:  # bos: attention to key_pos 0
                    mass = p[:, :, 0].sum(-1)
                rows.append(mass / n)  # all_rows: divided by every real query row
            per_prompt[name].append(torch.stack(rows))
    for name in names:
        expected = torch.stack(per_prompt[name]).mean(0)  # the mean over prompts
        torch.testing.assert_close(ours[name], expected, atol=1e-6, rtol=0)
