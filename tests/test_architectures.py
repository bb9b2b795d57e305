"""Models a user built themselves, of architectures other than Llama: every feature works or refuses
in one line (``LensAttnError``) naming what is missing.

The models are random-init and tiny (d_model 24, 3 query heads, 2 layers, vocab 400), built from
configs with nothing downloaded:

- ``TransformerBridge`` (both TransformerLens versions) around a transformers model of GPT-2,
  GPT-NeoX (Pythia: partial rotary, parallel attention and MLP), Qwen2 (q/k/v biases, GQA 3:1)
  and Gemma (``(1 + w)`` RMSNorm, embedding scale, GQA 3:1), with the suite's tiny tokenizer;
- ``HookedTransformer`` (3.9) from a ``HookedTransformerConfig``: GPT-2-style (LayerNorm, learned
  positions, biases) with no tokenizer.

References, written without lens-attn: TransformerLens's own ``run_with_cache`` patterns, and a
naive loop of ``run_with_hooks`` zeroing one head's ``hook_z`` for the ablation deltas (1e-5:
float32 forwards of a 2-layer model that differ only in summation order).
"""

import pytest
import torch
from transformer_lens.utilities import get_act_name

import lens_attn
from lens_attn import compat
from lens_attn.ablation import metrics, replay
from lens_attn.compat import HAS_HOOKED
from lens_attn.errors import LensAttnError

VOCAB = 400  # the tiny tokenizer's
ARCHITECTURES = ["gpt2", "neox", "qwen2", "gemma"]
# which sweep path each takes, and why not replay (a substring of the reason it reports)
EXPECTED_PATH = {
    "gpt2": ("no rotary attention", "resume"),
    "neox": ("parallel_attn_mlp", "resume"),
    "qwen2": (None, "replay"),
    "gemma": (None, "replay"),
}


def _hf_config(name: str):
    import transformers as T

    small = dict(num_hidden_layers=2, hidden_size=24, num_attention_heads=3, vocab_size=VOCAB,
                 max_position_embeddings=128, intermediate_size=40,
                 initializer_range=0.3)  # fmt: skip  # big enough weights that heads matter
    if name == "gpt2":
        return T.GPT2Config(n_layer=2, n_embd=24, n_head=3, vocab_size=VOCAB, n_positions=128,
                            initializer_range=0.3)  # fmt: skip
    if name == "neox":
        return T.GPTNeoXConfig(**small, rotary_pct=0.5)
    if name == "qwen2":
        return T.Qwen2Config(**small, num_key_value_heads=1)
    return T.GemmaConfig(**small, num_key_value_heads=1, head_dim=8)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def bridge(request, tokenizer):
    import transformers as T
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(7)
    hf = T.AutoModelForCausalLM.from_config(_hf_config(request.param), attn_implementation="eager")
    model = TransformerBridge.boot_transformers(
        request.param, hf_model=hf.eval(), tokenizer=tokenizer, device="cpu"
    )
    model.enable_compatibility_mode(disable_warnings=True)
    model.arch = request.param  # the test's own label
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_hooked_without_tokenizer():
    if not HAS_HOOKED:
        pytest.skip("needs HookedTransformer, which TransformerLens 4 removed")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=24, n_ctx=64, d_head=8, n_heads=3, d_vocab=50, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="standard", seed=3,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    for name, param in model.named_parameters():  # random biases too: they must be reproduced
        if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out")):
            torch.nn.init.normal_(param, std=0.1)
    return model.eval()


def _tokens(d_vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, d_vocab, (3, 14), generator=g)


@torch.no_grad()
def _naive_zero_deltas(model, tokens, heads) -> torch.Tensor:
    """Mean loss change per head, one ``run_with_hooks`` each zeroing ``hook_z[:, :, head]``."""

    def zero(head):
        def hook(z, hook):
            z = z.clone()
            z[:, :, head] = 0.0
            return z

        return hook

    base = metrics.per_prompt("loss", model(tokens), tokens)
    out = []
    for layer, head in heads:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("z", layer), zero(head))])
        out.append((metrics.per_prompt("loss", logits, tokens) - base).mean())
    return torch.stack(out)


def _check_sweep(model, tokens, path: str, reason: str | None, capsys) -> None:
    heads = [(0, 0), (0, 2), (1, 1)]
    result = lens_attn.ablation_sweep(model, tokens, heads=heads, metric="loss", verbose=True)
    assert result.provenance["path"] == path
    printed = capsys.readouterr().out
    if reason is None:
        assert result.provenance["path_reason"] == ""
    else:  # the fallback says why, in the result and on screen
        assert reason in result.provenance["path_reason"]
        assert reason in printed
    expected = _naive_zero_deltas(model, tokens, heads)
    torch.testing.assert_close(result.delta.float(), expected.float(), atol=1e-5, rtol=0)
    assert expected.abs().max() > 1e-3  # the ablations do something


def test_bridge_features_work_or_refuse_in_one_line(bridge, capsys, tmp_path):
    reason, path = EXPECTED_PATH[bridge.arch]
    if path == "resume" and not compat.can_start_at_layer(bridge):  # 3.9's bridge
        path = "full"
    assert (replay.replay_blocker(bridge) is None) == (reason is None)
    tokens = _tokens(VOCAB)

    scores = lens_attn.score_heads(bridge, progress=False)  # the default probes (tokenizer)
    assert scores["induction"].shape == (2, 3)

    patterns = lens_attn.capture_patterns(bridge, tokens)
    _, cache = bridge.run_with_cache(tokens)
    for layer in range(2):
        torch.testing.assert_close(patterns.pattern[layer], cache[get_act_name("pattern", layer)])

    _check_sweep(bridge, tokens, path, reason, capsys)

    plain = lens_attn.attribution_patching(bridge, tokens, metric="loss")
    assert torch.isfinite(plain.delta).all()
    for flag in ("qk_fix", "margin"):
        if reason is None:
            fixed = lens_attn.attribution_patching(bridge, tokens, metric="loss", **{flag: True})
            assert torch.isfinite(fixed.delta).all()
        else:
            with pytest.raises(LensAttnError, match=f"{flag}=True recomputes") as err:
                lens_attn.attribution_patching(bridge, tokens, metric="loss", **{flag: True})
            assert reason in str(err.value) and "\n" not in str(err.value)

    confirmed = lens_attn.confirm(
        bridge, labels={(1, 1): ("induction",)}, n_null=2, max_prompts=4, progress=False
    )
    assert len(confirmed.to_dataframe()) > 0
    report = lens_attn.render_report(patterns, scores, path=tmp_path / "report.html")
    assert report.stat().st_size > 0


def test_bridge_without_a_tokenizer_refuses_text_and_takes_tokens(bridge, monkeypatch):
    monkeypatch.setattr(bridge, "tokenizer", None)
    with pytest.raises(LensAttnError, match="no tokenizer.*pass tokens") as err:
        lens_attn.score_heads(bridge, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(LensAttnError, match="no tokenizer"):
        lens_attn.capture_patterns(bridge, "some text")
    with pytest.raises(LensAttnError, match="no tokenizer"):  # its default probes hold text
        lens_attn.confirm(bridge, labels={(1, 1): ("induction",)}, progress=False)
    patterns = lens_attn.capture_patterns(bridge, _tokens(VOCAB))
    assert patterns.str_tokens[0][:2] == [f"#{int(t)}" for t in _tokens(VOCAB)[0, :2]]
    scores = lens_attn.score_heads(bridge, _tokens(VOCAB), progress=False)
    assert torch.isfinite(scores["previous_token"]).all()


def test_user_built_hooked_gpt2_without_a_tokenizer(gpt2_hooked_without_tokenizer, capsys):
    model = gpt2_hooked_without_tokenizer
    tokens = _tokens(model.cfg.d_vocab)
    with pytest.raises(LensAttnError, match="no tokenizer.*induction_probes") as err:
        lens_attn.score_heads(model, progress=False)
    assert "\n" not in str(err.value)
    probes = lens_attn.induction_probes(model, periods=(5, 7), n_per_period=2)
    scores = lens_attn.score_heads(model, probes, progress=False)
    assert scores["induction"].shape == (2, 3)
    patterns = lens_attn.capture_patterns(model, tokens)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(patterns.pattern[1], cache[get_act_name("pattern", 1)])
    assert patterns.str_tokens[0][0] == f"#{int(tokens[0, 0])}"
    _check_sweep(model, tokens, "replay", None, capsys)  # learned positions replay as they are
    fixed = lens_attn.attribution_patching(model, tokens, metric="loss", qk_fix=True)
    assert torch.isfinite(fixed.delta).all()
