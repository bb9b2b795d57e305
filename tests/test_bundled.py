"""The shipped miniature Llama 2: it is the default model, it is in the wheel, and it has the
previous-token -> induction circuit the model card claims (measured here, on fresh probes)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import lens_attn
from lens_attn.loading import BUNDLED_CHECKPOINT
from lens_attn.probes import induction_probes, pad

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (
    "config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
)

if not (BUNDLED_CHECKPOINT / "model.safetensors").exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"the bundled checkpoint is missing from {BUNDLED_CHECKPOINT}")
    pytest.skip("bundled checkpoint not built yet", allow_module_level=True)


@pytest.fixture(scope="module")
def bundled():
    return lens_attn.load_model(device="cpu")


def test_default_model_is_the_bundled_gqa_checkpoint(bundled):
    cfg = bundled.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (4, 8, 2)
    assert cfg.d_vocab == len(bundled.tokenizer) == 2048
    tokenizer = bundled.tokenizer
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # the ▁ word-boundary convention survives into lens-attn's token strings
    assert lens_attn.capture_patterns(bundled, "The capital of France").str_tokens[0][:3] == [
        "<s>",
        " The",
        " c",
    ]  # "apital" follows


def test_checkpoint_is_small():
    total = sum(f.stat().st_size for f in BUNDLED_CHECKPOINT.iterdir())
    assert total <= 25 * 2**20, f"{total / 2**20:.1f} MiB"


def _second_copy_attention(model, period: int) -> torch.Tensor:
    """[layer, head_index] mean attention from r_i's second copy to r_{i+1}'s first copy."""
    patterns = lens_attn.capture_patterns(
        model, induction_probes(model, periods=(period,), n_per_period=16, seed=99)
    )
    q = torch.arange(period + 1, 2 * period + 1)
    return patterns.pattern[:, :, :, q, q - period + 1].mean(dim=(1, 3))


def test_induction_head_at_two_periods_with_a_previous_token_head_before_it(bundled):
    at_23, at_41 = _second_copy_attention(bundled, 23), _second_copy_attention(bundled, 41)
    both = torch.minimum(at_23, at_41)
    layer, head = divmod(int(both.argmax()), bundled.cfg.n_heads)
    assert both[layer, head] >= 0.4, (at_23, at_41)
    natural = [p for p in lens_attn.builtin_probes(bundled) if p.kind == "natural"]
    prev = lens_attn.score_heads(bundled, natural, scores=["previous_token"], progress=False)[
        "previous_token"
    ]
    assert layer > 0 and prev[:layer].max() >= 0.5, prev


@pytest.mark.parametrize("period", [23, 41])
def test_second_copy_loss_is_a_nat_lower(bundled, period):
    tokens, _ = pad(induction_probes(bundled, periods=(period,), n_per_period=16, seed=98))
    with torch.no_grad():
        nll = -bundled(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    first, second = nll[:, : period - 1].mean(), nll[:, period:].mean()
    assert first - second >= 1.0, (first.item(), second.item())


@pytest.mark.slow
def test_wheel_contains_the_checkpoint(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "lens_attn",
        source / "lens_attn",
        ignore=shutil.ignore_patterns("__pycache__", "*.tmp"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lens_attn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"lens_attn/data/tiny-llama-2/{name}" in names
    assert "lens_attn/data/natural_prompts.json" in names
    for asset in ("report.html", "report.js", "report.css"):  # the report's web app
        assert f"lens_attn/render/assets/{asset}" in names
    assert not any(name.startswith("lens_attn/benchmarking") for name in names)  # experiments/ only
