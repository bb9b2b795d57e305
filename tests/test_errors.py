"""One-line errors for every bad input (issue cases 5-8): broken checkpoints and configs through the
CLI (exit 2, ``lens-attn: error: ...``, the file named), non-finite weights, and the Python API's
checks of token ids, thresholds and head lists.

Broken copies are made from the tiny checkpoints of ``tests/checkpoints.py`` (via conftest).
"""

import json
import pickle
import shutil

import checkpoints
import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_attn.cli import main
from lens_attn.errors import CheckpointError, ConfigError, InputError, LensAttnError


@pytest.fixture
def hf_copy(tmp_path, tiny_checkpoints):
    path = tmp_path / "hf"
    shutil.copytree(tiny_checkpoints["mha"].path, path)
    return path


@pytest.fixture
def meta_copy(tmp_path, tiny_checkpoints, tiny_tokenizer_dir):
    path = tmp_path / "meta"
    checkpoints.write_meta_checkpoint(
        path, tiny_checkpoints["mha"].hf_model, tokenizer_dir=tiny_tokenizer_dir, n_shards=1
    )
    return path


def _edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _cli_error(capsys, model_dir, tmp_path, *extra) -> str:
    """Run ``lens-attn scores`` on ``model_dir``; assert exit 2 and one line; return the line."""
    status = main(
        ["scores", "--model", str(model_dir), "--device", "cpu", *extra,
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("lens-attn: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


# ---------------------------------------------------------------- 5/6. config.json values


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a whole number >= 1, got 0"),
        (
            {"hidden_size": "128"},
            "hidden_size must be a whole number >= 1 (a JSON integer), got str",
        ),
        ({"hidden_size": -16}, "hidden_size must be a whole number >= 1, got -16"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers must be a whole number >= 1 (a JSON int"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be a whole number >= 1 (a JSON int"),
        ({"intermediate_size": None}, "intermediate_size must be a whole number"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a positive finite number, got str"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive finite number, got 0"),
        ({"max_position_embeddings": -5}, "max_position_embeddings must be a whole number >= 1"),
        ({"rope_theta": -1}, "rope_theta must be a positive finite number, got -1"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
            "rope_parameters: rope_theta must be a positive finite number, got -1.0",
        ),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_5_bad_config_values_are_one_line_config_errors(
    hf_copy, tmp_path, capsys, changes, message
):
    _edit_json(hf_copy / "config.json", **changes)
    err = _cli_error(capsys, hf_copy, tmp_path)
    assert message in err and "config.json" in err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dim": [128]}, "dim must be a whole number >= 1 (a JSON integer), got list"),
        ({"norm_eps": None}, "norm_eps must be a positive finite number, got NoneType"),
        ({"n_layers": 2.5}, "n_layers must be a whole number >= 1"),
        ({"n_heads": 0}, "n_heads must be a whole number >= 1, got 0"),
        ({"rope_theta": -1}, "rope_theta must be a positive finite number, got -1"),
        ({"vocab_size": "400"}, "vocab_size must be a whole number"),
    ],
    ids=["dim-list", "norm_eps-null", "n_layers-float", "n_heads-0", "rope_theta-neg", "vocab-str"],
)
def test_5_bad_meta_params_are_one_line_config_errors(
    meta_copy, tmp_path, capsys, changes, message
):
    _edit_json(meta_copy / "params.json", **changes)
    err = _cli_error(capsys, meta_copy, tmp_path)
    assert message in err and "params.json" in err


@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_7_an_undecodable_config_file_is_named(hf_copy, meta_copy, tmp_path, capsys, name):
    directory = hf_copy if name == "config.json" else meta_copy
    (directory / name).write_bytes(b'{"dim": "\xff\xfe"}')
    err = _cli_error(capsys, directory, tmp_path)
    assert f"{name} is not UTF-8" in err


# ------------------------------------------------------------------- 5. broken weight files


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage", "empty", "unsafe-pickle-bin", "raw-pickle-bin", "truncated-bin"],
)
def test_5_corrupt_or_unsafe_hf_weights_are_one_line_checkpoint_errors(
    hf_copy, tmp_path, capsys, damage
):
    weights = hf_copy / "model.safetensors"
    if damage == "truncated":
        _truncate(weights)
    elif damage == "garbage":
        weights.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not a safetensors header" * 10)
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        state = load_file(weights)
        weights.unlink()
        weights = hf_copy / "pytorch_model.bin"
        if damage == "unsafe-pickle-bin":
            torch.save({**state, "extra": _Evil()}, weights)  # refused by weights_only
        elif damage == "raw-pickle-bin":
            weights.write_bytes(pickle.dumps(_Evil()))
        else:
            torch.save(state, weights)
            _truncate(weights)
    err = _cli_error(capsys, hf_copy, tmp_path)
    assert str(weights) in err
    if damage == "unsafe-pickle-bin":
        assert "was refused: it is not a plain tensor checkpoint" in err
    else:  # a raw pickle is not torch.save's zip format
        assert "is corrupt or truncated and cannot be read" in err


@pytest.mark.parametrize("damage", ["truncated", "raw-pickle", "unsafe-pickle"])
def test_5_corrupt_or_unsafe_meta_shards_are_one_line_checkpoint_errors(
    meta_copy, tmp_path, capsys, damage
):
    shard = meta_copy / "consolidated.00.pth"
    if damage == "truncated":
        _truncate(shard)
    elif damage == "raw-pickle":
        shard.write_bytes(pickle.dumps({"tok_embeddings.weight": [1.0, 2.0]}))
    else:
        torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": _Evil()}, shard)
    err = _cli_error(capsys, meta_copy, tmp_path)
    assert str(shard) in err


def test_5_model_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    err = _cli_error(capsys, file, tmp_path)
    assert "expected a checkpoint directory, got a file" in err


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_6_one_non_finite_weight_is_a_checkpoint_error_naming_the_tensor(hf_copy, value):
    from lens_attn.loading import load_model

    weights = hf_copy / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.self_attn.q_proj.weight"][3, 5] = value
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight holds 1"
    ):
        load_model(hf_copy, device="cpu")


def test_6_a_meta_shard_with_a_nan_is_refused(meta_copy):
    from lens_attn.loading import load_model

    shard = meta_copy / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    state["layers.0.feed_forward.w2.weight"][0, 0] = float("nan")
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match="mlp.down_proj.weight holds 1 non-finite"):
        load_model(meta_copy, device="cpu")


# ---------------------------------------------------------------------- 7. CLI input messages


def test_7_prompts_that_are_a_folder_or_not_utf8_name_the_file(tmp_path, capsys):
    for prompts, message in [
        (tmp_path, "is a folder; give a text file"),
        (tmp_path / "latin1.txt", "latin1.txt is not UTF-8 text"),
    ]:
        if prompts != tmp_path:
            prompts.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
        assert main(["scores", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lens-attn: error: --prompts") and message in err


@pytest.mark.parametrize("option", ["--batch-size", "--query-chunk", "--n-devices"])
def test_7_negative_sizes_say_what_is_valid(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["scores", option, "-3", "--out", "o"])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be a positive integer, got -3" in capsys.readouterr().err


def test_7_patterns_scores_dir_with_someone_elses_json(tmp_path, capsys):
    (tmp_path / "scores.json").write_text(json.dumps({"rows": [1, 2]}))
    assert main(["patterns", "hi", "--scores", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lens-attn: error: ") and "was not written by HeadScores.save" in err
    assert err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "scores.json").write_text("{}")
    argv = ["patterns", "hi", "--scores", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(["--debug", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main([*argv, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_os_errors_are_one_line_failures_with_status_1(tmp_path, capsys, monkeypatch):
    from lens_attn import cli

    def full_disk(args, parser):
        raise OSError(28, "No space left on device", str(tmp_path / "scores.csv"))

    monkeypatch.setattr(cli, "run_scores", full_disk)
    assert main(["scores", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"lens-attn: error: {tmp_path / 'scores.csv'}: No space left on device\n"


# ------------------------------------------------------------------------------ 8. Python API


@pytest.mark.parametrize(
    "tokens, message",
    [
        (
            torch.tensor([[1, 5, -1]]),
            "token id -1, outside the model's vocabulary; valid ids: 0..399",
        ),
        (torch.tensor([[1, 5, 400]]), "token id 400"),
        (torch.tensor([[1.0, 5.0, 7.0]]), "integer tensor of token ids"),
        (torch.tensor([[True, False]]), "integer tensor of token ids"),
    ],
    ids=["negative", "past-vocab", "float", "bool"],
)
def test_8_bad_token_tensors_are_refused(tiny_model, tokens, message):
    from lens_attn import capture_patterns
    from lens_attn.probes import as_probes

    with pytest.raises(InputError, match=message):
        as_probes(tiny_model, tokens)
    with pytest.raises(InputError, match=message):
        capture_patterns(tiny_model, tokens)


@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")], ids=["nan", "-1", "inf"])
def test_8_classify_thresholds_must_be_finite_non_negative_numbers(value):
    from lens_attn.scoring.results import HeadScores

    grid = torch.rand(2, 3)
    scores = HeadScores({"induction": grid}, {"induction": torch.zeros_like(grid)})
    with pytest.raises(InputError, match="threshold for 'induction' must be"):
        scores.classify({"induction": value})
    assert scores.classify({"induction": 0.0})  # 0 is allowed: every head gets the label


@pytest.mark.parametrize("heads", [[(True, 1)], (True, 1), [], (), [(1.5, 0)]])
def test_8_ablate_refuses_unreadable_or_empty_heads(tiny_model, heads):
    from lens_attn import ablate

    with pytest.raises(InputError, match="cannot read head|got no heads"):
        ablate(tiny_model, heads)


def test_the_errors_are_value_errors():
    for cls in (CheckpointError, ConfigError, InputError):
        assert issubclass(cls, LensAttnError) and issubclass(cls, ValueError)
