"""Ablations (``lens_attn.ablation.methods``) and the metrics they are measured with (``metrics``).

References are independent of the batched code: a plain ``model.run_with_hooks`` per ablation, a
hand-written hook that zeroes ``hook_attn_out``, TransformerLens's own loss, and single-prompt runs.
"""

import json
import math

import pytest
import torch
from transformer_lens.utilities import get_act_name

from lens_attn import compat
from lens_attn.ablation import metrics, replay
from lens_attn.ablation.methods import ablate
from lens_attn.ablation.result import AblationResult
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.heads import resolve_heads
from lens_attn.probes import Probe, induction_probes, pad

METHODS = ["zero", "mean", "resample", "bos", "uniform"]


@pytest.fixture(scope="module", params=["mha", "gqa"], ids=["mha", "gqa"])
def model(request, tiny_checkpoints):
    from lens_attn.loading import load_model

    return load_model(tiny_checkpoints[request.param].path, device="cpu")


@pytest.fixture(scope="module")
def gqa_model(tiny_checkpoints):
    from lens_attn.loading import load_model

    return load_model(tiny_checkpoints["gqa"].path, device="cpu")


def _probes(model, n_per_period: int = 3) -> list[Probe]:
    # two periods -> lengths 11 and 15: the batch is right-padded, so padding is exercised
    return induction_probes(model, periods=(5, 7), n_per_period=n_per_period, seed=3)


def _hook_count(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


@torch.no_grad()
def _naive(model, probes, units, method, metric="loss") -> torch.Tensor:
    """Reference: one ``run_with_hooks`` per ablation, each prompt run alone (no padding at all)."""
    out = torch.empty(len(units), len(probes))
    for u, unit in enumerate(units):
        hooks = list(ablate(model, unit, method=method, reference=probes))
        for p, probe in enumerate(probes):
            tokens = probe.tokens[None]
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            out[u, p] = metrics.per_prompt(metric, logits, tokens, periods=[probe.period])[0]
    return out


# ---------------------------------------------------------------------------------- invariants


def test_ablating_no_heads_reproduces_clean_logits_exactly(model):
    tokens, _ = pad(_probes(model))
    with torch.no_grad():
        clean = model(tokens)
        with ablate(model, [], allow_empty=True) as ablation:
            inside = model(tokens)
        no_hooks = ablate(model, [], method="bos", allow_empty=True)
        hooked = model.run_with_hooks(tokens, fwd_hooks=list(no_hooks))
    assert len(ablation) == 0
    assert torch.equal(inside, clean)
    assert torch.equal(hooked, clean)


def test_zero_every_head_of_a_layer_equals_zeroing_attn_out(model):
    # Llama has no attention output bias (loading folds b_V into b_O, which stays zero), so zeroing
    # every head's z leaves exactly b_O = 0 as the layer's attention output.
    for block in model.blocks:  # None on a TransformerBridge: HF's o_proj has no bias at all
        assert block.attn.b_O is None or torch.count_nonzero(block.attn.b_O) == 0
    tokens, _ = pad(_probes(model))
    layer = 1

    def zero_attn_out(act, hook):
        return torch.zeros_like(act)

    with torch.no_grad():
        reference = model.run_with_hooks(
            tokens, fwd_hooks=[(get_act_name("attn_out", layer), zero_attn_out)]
        )
        with ablate(model, f"L{layer}", method="zero"):
            ablated = model(tokens)
        clean = model(tokens)
    # 1e-5: the two paths only differ by a float32 matmul with zeros vs. no matmul
    torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=0)
    assert (ablated - clean).abs().max() > 1e-3  # the ablation does something


@pytest.mark.parametrize("method", METHODS)
def test_sweep_equals_naive_loop(model, method):
    probes = _probes(model, 2)  # 4 prompts, lengths 11 and 15
    last_layer, last_head = model.cfg.n_layers - 1, model.cfg.n_heads - 1
    units = [[(0, 0)], [(1, last_head)], [(last_layer, 1)], [(1, 0), (1, 2)]]
    spanning = [(0, 1), (last_layer, 0)]  # a group spanning layers: later heads ablated in replay
    if method == "resample":
        # resample's draw depends on the batch size: compare with one run_with_hooks over the whole
        # padded batch, and a sweep that keeps all prompts in one pass
        tokens, mask = pad(probes)
        with torch.no_grad():
            expected = torch.stack([
                metrics.loss(model.run_with_hooks(
                    tokens, fwd_hooks=list(ablate(model, u, method=method, reference=probes))
                ), tokens, mask) for u in [*units, spanning]
            ])  # fmt: skip
    else:
        expected = _naive(model, probes, [*units, spanning], method)
    # replay needs a HookedTransformer; resume, a model that starts at a layer (a TransformerBridge
    # does from TransformerLens 4.0)
    resume = "resume" if compat.can_start_at_layer(model) else "full"
    output_method = method in ("zero", "mean", "resample")
    replayed = "replay" if output_method and replay.supports_replay(model) else resume
    # every way a sweep can run a pass (sweep._sweep_path); max_batch=64: many ablations per
    # pass; 6 with 4 prompts: one ablation per pass; 3: the prompts are chunked too
    for heads, reuse_prefix, path, rows in [
        (units, True, replayed, expected[:-1]),
        ([*units, spanning], True, replayed, expected),
        ([*units, spanning], False, "full", expected),
    ]:
        for max_batch in (64, 6, 3) if method != "resample" else (64,):
            result = ablation_sweep(
                model, probes, method=method, heads=heads, reference=probes, max_batch=max_batch,
                reuse_prefix=reuse_prefix,
            )  # fmt: skip
            assert result.provenance["path"] == path
            # 1e-4: batched vs. single-prompt float32 matmuls differ by ~1e-6 relative on losses ~6
            torch.testing.assert_close(result.ablated_per_prompt, rows, atol=1e-4, rtol=0)
    assert result.delta.abs().max() > 1e-4


@torch.no_grad()
def _naive_direct(model, probes, units, metric) -> torch.Tensor:
    """Reference direct effects: each prompt run alone, the units' ``hook_z @ W_O`` read by one
    hook and subtracted from the last ``hook_resid_post`` by another (zero ablation, direct path)."""
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    out = torch.empty(len(units), len(probes))
    for u, unit in enumerate(units):
        for p, probe in enumerate(probes):
            written = []

            def read(z, hook, unit=unit, written=written):
                layer = int(hook.name.split(".")[1])
                for lay, head in unit:
                    if lay == layer:
                        written.append(z[:, :, head] @ model.W_O[layer, head])

            layers = sorted({layer for layer, _ in unit})
            hooks = [(f"blocks.{layer}.attn.hook_z", read) for layer in layers]
            hooks.append((last, lambda resid, hook, written=written: resid - sum(written)))
            tokens = probe.tokens[None]
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            out[u, p] = metrics.per_prompt(metric, logits, tokens, periods=[probe.period])[0]
    return out


@pytest.mark.parametrize("metric", ["loss", "induction_loss"])
def test_direct_sweep_equals_naive_direct_path(model, metric):
    probes = _probes(model, 2)  # right-padded: lengths 11 and 15
    last_layer = model.cfg.n_layers - 1
    units = [[(0, 0)], [(last_layer, 1)], [(0, 1), (last_layer, 0)], [(1, 0), (1, 2)]]
    expected = _naive_direct(model, probes, units, metric)
    for max_batch in (64, 3):
        result = ablation_sweep(model, probes, metric=metric, heads=units, direct=True,
                                max_batch=max_batch)  # fmt: skip
        assert result.provenance["path"] == "direct"
        torch.testing.assert_close(result.ablated_per_prompt, expected, atol=1e-4, rtol=0)
    total = ablation_sweep(model, probes, metric=metric, heads=units[:1])
    assert (total.delta - result.delta[:1]).abs().max() > 1e-4  # layer 0 also acts through layer 1
    with pytest.raises(ValueError, match="direct=True .* got 'bos'"):
        ablation_sweep(model, probes, method="bos", heads=units, direct=True)


def test_sweep_layers_and_kv_groups_match_naive(gqa_model):
    model, probes = gqa_model, _probes(gqa_model, 2)
    layers = ablation_sweep(model, probes, heads="layers")
    assert layers.labels == [f"L{layer}" for layer in range(model.cfg.n_layers)]
    units = [[(layer, h) for h in range(model.cfg.n_heads)] for layer in range(model.cfg.n_layers)]
    torch.testing.assert_close(
        layers.ablated_per_prompt, _naive(model, probes, units, "zero"), atol=1e-4, rtol=0
    )
    groups = ablation_sweep(model, probes, heads="kv_groups", metric="induction_loss")
    # gqa: 6 query heads read 2 kv heads, so group 1 of layer 0 is query heads 3, 4, 5
    assert groups.units[1] == [(0, 3), (0, 4), (0, 5)]
    torch.testing.assert_close(
        groups.ablated_per_prompt,
        _naive(model, probes, groups.units, "zero", "induction_loss"),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("method", METHODS)
def test_gqa_query_head_ablation_leaves_other_heads_z(gqa_model, method):
    model, probes = gqa_model, _probes(gqa_model)
    tokens, _ = pad(probes)
    name = get_act_name("z", 1)
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=name)
        with ablate(model, (1, 4), method=method, reference=probes):
            _, ablated = model.run_with_cache(tokens, names_filter=name)
    others = [h for h in range(model.cfg.n_heads) if h != 4]  # 3 and 5 share head 4's kv head
    assert torch.equal(ablated[name][:, :, others], clean[name][:, :, others])
    assert not torch.allclose(ablated[name][:, :, 4], clean[name][:, :, 4])


def test_kv_group_expansion(gqa_model):
    assert resolve_heads(gqa_model, [(1, 4)], kv_group=True) == [(1, 3), (1, 4), (1, 5)]
    assert resolve_heads(gqa_model, [], groups=[(2, 0), "L0KV1"]) == [
        (0, 3), (0, 4), (0, 5), (2, 0), (2, 1), (2, 2),
    ]  # fmt: skip
    assert resolve_heads(gqa_model, ["L1H2", (1, 2, 0.9), "L0"]) == [(0, h) for h in range(6)] + [
        (1, 2)
    ]


def test_context_manager_removes_hooks_even_when_body_raises(model):
    before = _hook_count(model)
    ablation = ablate(model, ["L0H1", "L1H0"], method="bos")
    with pytest.raises(RuntimeError, match="boom"):
        with ablation:
            assert _hook_count(model) == before + 2
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    with ablation:  # reusable after exit
        assert _hook_count(model) == before + 2
    assert _hook_count(model) == before


def test_context_manager_equals_fwd_hooks(model):
    tokens, _ = pad(_probes(model))
    ablation = ablate(model, [(0, 0), (1, 1)], method="uniform")
    assert [name for name, _ in ablation] == [
        get_act_name("attn_scores", 0),
        get_act_name("attn_scores", 1),
    ]
    with torch.no_grad():
        with ablation:
            inside = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=ablation.fwd_hooks)
    assert torch.equal(inside, hooked)


def test_bos_and_uniform_patterns(gqa_model):
    tokens, _ = pad(_probes(gqa_model))
    name = get_act_name("pattern", 0)
    with torch.no_grad():
        with ablate(gqa_model, (0, 2), method="bos"):
            _, bos = gqa_model.run_with_cache(tokens, names_filter=name)
        with ablate(gqa_model, (0, 2), method="uniform"):
            _, uniform = gqa_model.run_with_cache(tokens, names_filter=name)
    n = tokens.shape[1]
    one_hot = torch.zeros(n, n)
    one_hot[:, 0] = 1
    assert torch.equal(bos[name][0, 2], one_hot)
    # uniform over the causal keys: row q is 1 / (q + 1) on keys 0..q
    expected = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    torch.testing.assert_close(uniform[name][0, 2], expected, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------- result


def test_result_table_grid_stderr_and_save_load(gqa_model, tmp_path):
    probes = _probes(gqa_model)
    result = ablation_sweep(gqa_model, probes, heads=["L0H1", (2, 5), ["L1H0", "L1H1"]])
    df = result.to_dataframe()
    assert list(df.columns) == ["unit", "layer", "head", "baseline", "ablated", "delta", "stderr"]
    assert df["unit"].tolist() == ["L0H1", "L2H5", "L1H0+L1H1"]
    assert df["head"].tolist() == [1, 5, -1] and df["layer"].tolist() == [0, 2, 1]
    diff = result.ablated_per_prompt - result.baseline_per_prompt
    torch.testing.assert_close(result.stderr, diff.std(dim=1) / math.sqrt(len(probes)))
    grid = result.grid()
    assert grid.shape == (3, 6) and int((~grid.isnan()).sum()) == 2
    assert float(grid[2, 5]) == pytest.approx(float(result.delta[1]))
    result.save(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"ablation.csv", "ablation.json"}
    loaded = AblationResult.load(tmp_path / "run")
    assert loaded.units == result.units and loaded.method == "zero" and loaded.metric == "loss"
    torch.testing.assert_close(loaded.ablated_per_prompt, result.ablated_per_prompt)
    assert loaded.to_dataframe().equals(df)
    layers = ablation_sweep(gqa_model, probes, heads="layers")
    assert layers.to_dataframe()["head"].tolist() == [-1, -1, -1]
    assert bool(layers.grid().isnan().all())


def test_sweep_from_top_scores_and_callable_metric(gqa_model):
    probes = _probes(gqa_model, 2)
    top = [(1, 2, 0.8), (0, 0, 0.5)]  # what HeadScores.top returns

    def last_loss(logits, tokens):  # loss of the last prediction only
        return torch.nn.functional.cross_entropy(logits[0, -2], tokens[0, -1])

    result = ablation_sweep(gqa_model, probes, heads=top, metric=last_loss)
    assert result.labels == ["L1H2", "L0H0"] and result.metric == "last_loss"
    with torch.no_grad():
        hooks = list(ablate(gqa_model, "L1H2"))
        expected = [
            last_loss(gqa_model.run_with_hooks(p.tokens[None], fwd_hooks=hooks), p.tokens[None])
            for p in probes
        ]
    torch.testing.assert_close(
        result.ablated_per_prompt[0], torch.stack(expected), atol=1e-4, rtol=0
    )


# ------------------------------------------------------------------------------------- metrics


def test_metrics_against_transformer_lens_and_single_prompts(gqa_model):
    probes = _probes(gqa_model)
    tokens, mask = pad(probes)
    with torch.no_grad():
        logits = gqa_model(tokens)
        per_pos = metrics.per_position_loss(logits, tokens, mask)
        for i, probe in enumerate(probes):
            alone = probe.tokens[None]
            tl_loss = gqa_model(alone, return_type="loss", loss_per_token=True)[0]  # [pos - 1]
            n = len(probe.tokens)
            # 1e-5: same float32 forward, batched with padding vs. alone
            torch.testing.assert_close(per_pos[i, : n - 1], tl_loss, atol=1e-5, rtol=0)
            assert bool(per_pos[i, n - 1 :].isnan().all())
            loss = metrics.loss(logits, tokens, mask)[i]
            torch.testing.assert_close(loss, tl_loss.mean(), atol=1e-5, rtol=0)
            # induction_loss: targets r_2..r_n of the second copy, i.e. token positions n+2..2n
            period = probe.period
            ind = metrics.induction_loss(logits, tokens, mask, periods=[p.period for p in probes])[
                i
            ]
            torch.testing.assert_close(ind, tl_loss[period + 1 :].mean(), atol=1e-5, rtol=0)
            preds = gqa_model(alone)[0, :-1].argmax(-1)
            acc = metrics.accuracy(logits, tokens, mask)[i]
            assert float(acc) == pytest.approx(
                float((preds == alone[0, 1:]).float().mean()), abs=1e-6
            )
        # periods read from the tokens when not given
        torch.testing.assert_close(
            metrics.induction_loss(logits, tokens, mask),
            metrics.induction_loss(logits, tokens, mask, periods=[p.period for p in probes]),
        )
        answers = torch.tensor([[5, 9]]).expand(len(probes), 2)
        diff = metrics.logit_diff(logits, tokens, mask, answer_tokens=answers)
        last = mask.sum(1) - 1
        expected = (
            logits[torch.arange(len(probes)), last][:, 5]
            - logits[torch.arange(len(probes)), last][:, 9]
        )
        torch.testing.assert_close(diff, expected)


def test_logit_diff_sweep(gqa_model):
    probes = _probes(gqa_model, 2)
    result = ablation_sweep(gqa_model, probes, metric="logit_diff", answer_tokens=(5, 9),
                            heads=["L2H0"])  # fmt: skip
    tokens, mask = pad(probes)
    with torch.no_grad():
        logits = gqa_model.run_with_hooks(tokens, fwd_hooks=list(ablate(gqa_model, "L2H0")))
    answers = torch.tensor([[5, 9]]).expand(len(probes), 2)
    expected = metrics.logit_diff(logits, tokens, mask, answer_tokens=answers)
    torch.testing.assert_close(result.ablated_per_prompt[0], expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_errors(gqa_model):
    model, probes = gqa_model, _probes(gqa_model, 1)
    # with jaxtyping's import hook on (pytest config) beartype rejects the Literal first
    # (TypeError); without it the function's own ValueError lists the valid methods. Both name
    # "resample".
    with pytest.raises((ValueError, TypeError), match="resample"):
        ablate(model, "L0H0", method="knockout")
    with pytest.raises(ValueError, match="unknown ablation method 'knockout'; valid: zero, mean"):
        from lens_attn.ablation.methods import check_method

        check_method("knockout")
    with pytest.raises(ValueError, match="head 9 out of range; valid heads 0..5"):
        ablate(model, "L1H9")
    with pytest.raises(ValueError, match="layer 7 out of range"):
        ablation_sweep(model, probes, heads=[(7, 0)])
    with pytest.raises(ValueError, match="cannot read head"):
        ablate(model, "head three")
    with pytest.raises(ValueError, match="kv_head 0..1"):
        ablate(model, [], groups=[(0, 2)])
    with pytest.raises(ValueError, match="must return a scalar"):
        ablation_sweep(model, probes, heads=["L0H0"], metric=lambda logits, tokens: logits[0, :, 0])
    for method in ("mean", "resample"):
        with pytest.raises(ValueError, match=f"method='{method}' needs reference data"):
            ablate(model, "L0H0", method=method)
        with pytest.raises(ValueError, match="needs reference data"):
            ablation_sweep(model, probes, method=method)
    too_long = torch.randint(3, 100, (1, model.cfg.n_ctx + 1))
    with pytest.raises(ValueError, match=f"n_ctx={model.cfg.n_ctx}"):
        ablation_sweep(model, too_long)
    with pytest.raises((ValueError, TypeError), match="induction_loss"):
        ablation_sweep(model, probes, metric="induction")
    with pytest.raises(ValueError, match="not one"):
        ablation_sweep(model, torch.randint(3, 100, (2, 12)), metric="induction_loss")
    with pytest.raises(ValueError, match="needs answer_tokens"):
        ablation_sweep(model, probes, metric="logit_diff")
    with pytest.raises(ValueError, match="heads is empty"):
        ablation_sweep(model, probes, heads=[])
    short_reference = torch.randint(3, 100, (2, 4))
    with pytest.raises(ValueError, match="reference prompts only 4"):
        ablation_sweep(model, probes, method="mean", reference=short_reference, heads=["L0H0"])


# ---------------------------------------------------------------------------------- bridge


@pytest.mark.hooked_only
def test_bridge_in_compatibility_mode_matches_hooked(tiny_checkpoints, gqa_model):
    from lens_attn.loading import load_model

    bridge = load_model(tiny_checkpoints["gqa"].path, device="cpu", backend="bridge")
    probes = _probes(gqa_model, 2)
    tokens, _ = pad(probes)
    for method in METHODS:
        outs = []
        for model in (gqa_model, bridge):
            with torch.no_grad(), ablate(model, ["L1H3", "L2H0"], method=method, reference=probes):
                outs.append(model(tokens))
        # the two backends compute the same float32 model along different code paths
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)
    hooked = ablation_sweep(gqa_model, probes, heads=["L1H3", "L2"], metric="induction_loss")
    bridged = ablation_sweep(bridge, probes, heads=["L1H3", "L2"], metric="induction_loss")
    torch.testing.assert_close(
        hooked.ablated_per_prompt, bridged.ablated_per_prompt, atol=1e-4, rtol=0
    )


def test_bench_script_runs(tiny_checkpoints, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments" / "bench_ablation.py"
    spec = importlib.util.spec_from_file_location("bench_ablation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench"
    args = ["--model", str(tiny_checkpoints["gqa"].path), "--periods", "5,7", "--n-per-period", "2"]
    assert bench.main([*args, "--repeats", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"bench.json", "sweep", "attribution"}
    report = json.loads((out / "bench.json").read_text())
    assert report["max_abs_delta_difference"] < 1e-4  # naive and batched agree
    assert str(out / "bench.json") in capsys.readouterr().out
