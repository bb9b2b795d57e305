"""Read Meta's original Llama 2 layout as a Hugging Face ``LlamaForCausalLM`` state dict.

Meta's download (``download.sh`` from github.com/meta-llama/llama) looks like::

    llama-2-13b/
        params.json            # dim, n_layers, n_heads, [n_kv_heads], vocab_size, multiple_of, ...
        consolidated.00.pth    # one file per model-parallel rank: 7B -> 1, 13B -> 2, 70B -> 8
        consolidated.01.pth
    tokenizer.model            # SentencePiece; next to the weights or one directory up

Each ``consolidated.NN.pth`` holds one rank's slice of every tensor (fairscale model parallelism):

* column-parallel (split along dim 0, the output rows): ``attention.wq/wk/wv``,
  ``feed_forward.w1/w3`` and ``output``;
* row-parallel (split along dim 1, the input columns): ``attention.wo`` and ``feed_forward.w2``;
* ``tok_embeddings`` (``ParallelEmbedding``) is split along dim 1, the embedding dimension;
* the RMSNorm weights (and ``rope.freqs`` if present) are replicated on every rank.

Meta's rotary embedding rotates *adjacent* pairs of a head's query/key dimensions (``2i, 2i+1``,
a complex view); Hugging Face's and TransformerLens's Llama rotate *halves* (``i, i + d_head/2``).
The two agree once the rows of ``wq``/``wk`` inside every head are permuted as transformers'
``convert_llama_weights_to_hf.py`` does (:func:`permute_rotary_rows`; ``wk`` uses ``n_kv_heads``).
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lens_attn.errors import ConfigError
from lens_attn.loading.meta_shards import (  # noqa: F401  (SHARD_PATTERN, SPLIT_DIM: re-exported)
    _LAYER_KEY,
    SHARD_PATTERN,
    SPLIT_DIM,
    _split_dim,
    merge_meta_shards,
    open_meta_shards,
)
from lens_attn.loading.readers import CheckpointReader, release_tensor_pages
from lens_attn.validation import config_float, config_int

PARAMS_FILE = "params.json"

# params.json keys we understand. Anything else may change the maths: refused, never ignored.
KNOWN_PARAMS = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
    "norm_eps", "rope_theta", "max_seq_len",
    "max_batch_size",  # inference-time KV-cache size in Meta's code; no effect on the maths
    "use_scaled_rope",  # Llama 3.1 rope scaling; only ``false`` is accepted
)  # fmt: skip
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "norm_eps")


@dataclass(frozen=True)
class MetaParams:
    """The model hyper-parameters of a Meta ``params.json``, with Llama 2's defaults filled in."""

    dim: int  # d_model
    n_layers: int
    n_heads: int
    n_kv_heads: int  # = n_heads when params.json has no n_kv_heads (7B, 13B)
    vocab_size: int | None  # None when params.json says -1: the embedding's row count decides
    norm_eps: float
    rope_theta: float  # default 10000.0 (Llama 2); Code Llama writes 1000000.0
    max_seq_len: (
        int  # not in Llama 2's params.json: 4096, or 16384 when rope_theta > 10000 (Code Llama)
    )
    multiple_of: int | None
    ffn_dim_multiplier: float | None

    @property
    def d_head(self) -> int:
        return self.dim // self.n_heads

    def expected_d_mlp(self) -> int | None:
        """SwiGLU hidden size by Meta's ``FeedForward`` rule, or None without ``multiple_of``."""
        if self.multiple_of is None:
            return None
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def is_meta_checkpoint(directory: str | Path) -> bool:
    """True if ``directory`` has a ``params.json`` (Meta's layout)."""
    return (Path(directory) / PARAMS_FILE).is_file()


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; ConfigError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); JSON files are UTF-8"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_meta_params(directory: str | Path) -> MetaParams:
    """Read and check ``params.json``; unknown or unsupported fields raise ``ValueError``."""
    path = Path(directory) / PARAMS_FILE
    raw = read_json_object(path)
    unknown = sorted(set(raw) - set(KNOWN_PARAMS))
    if unknown:
        raise ValueError(
            f"{path} has fields lens-attn does not understand: {unknown}; they may change the "
            "model's maths, so they are refused rather than ignored. Known fields: "
            f"{list(KNOWN_PARAMS)}"
        )
    missing = [key for key in REQUIRED_PARAMS if key not in raw]
    if missing:
        raise ValueError(
            f"{path} is missing required fields {missing}; required: {REQUIRED_PARAMS}"
        )
    if raw.get("use_scaled_rope"):
        raise ValueError(
            f"{path} sets use_scaled_rope=true (Llama 3.1 rope scaling), which is not supported; "
            "valid: absent or false"
        )
    src = str(path)
    for key in ("dim", "n_layers", "n_heads"):
        config_int(raw, key, source=src)
    for key in ("n_kv_heads", "multiple_of", "max_seq_len", "max_batch_size"):
        config_int(raw, key, source=src, optional=True)
    if raw.get("vocab_size", -1) != -1:  # -1: the embedding's row count decides
        config_int(raw, "vocab_size", source=src)
    config_float(raw, "norm_eps", source=src)
    for key in ("rope_theta", "ffn_dim_multiplier"):
        config_float(raw, key, source=src, optional=True)
    dim, n_heads = int(raw["dim"]), int(raw["n_heads"])
    n_kv_heads = int(raw.get("n_kv_heads") or n_heads)
    if dim % n_heads != 0:
        raise ValueError(f"{path}: dim={dim} is not divisible by n_heads={n_heads}")
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"{path}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if (dim // n_heads) % 2 != 0:
        raise ValueError(f"{path}: d_head={dim // n_heads} must be even for rotary embeddings")
    vocab_size = int(raw.get("vocab_size", -1))
    rope_theta = float(raw.get("rope_theta", 10000.0))
    default_ctx = 16384 if rope_theta > 10000.0 else 4096
    return MetaParams(
        dim=dim,
        n_layers=int(raw["n_layers"]),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size if vocab_size > 0 else None,
        norm_eps=float(raw["norm_eps"]),
        rope_theta=rope_theta,
        max_seq_len=int(raw.get("max_seq_len", default_ctx)),
        multiple_of=int(raw["multiple_of"]) if raw.get("multiple_of") is not None else None,
        ffn_dim_multiplier=(
            float(raw["ffn_dim_multiplier"]) if raw.get("ffn_dim_multiplier") is not None else None
        ),
    )


def load_meta_state_dict(directory: str | Path, params: MetaParams) -> dict[str, Tensor]:
    """Merge all ``consolidated.NN.pth`` shards into one state dict with Meta's tensor names.

    The number of shards is not written anywhere, so it is inferred from shard 00: the width of its
    ``tok_embeddings`` slice divides ``params.dim``. Every shard ``00 .. n-1`` must be present
    (``FileNotFoundError`` naming the missing ones) and hold the same tensor names; replicated
    tensors must agree across shards; merged shapes are checked by :func:`meta_to_hf_state_dict`.
    """
    return merge_meta_shards(open_meta_shards(directory, params.dim))


def permute_rotary_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a Meta ``wq``/``wk`` from adjacent-pair to rotate-half rotary order.

    Inside every head, output row ``2i`` moves to ``i`` and row ``2i + 1`` to ``i + d_head/2``,
    which is transformers' ``permute`` in ``convert_llama_weights_to_hf.py``. Pass ``n_kv_heads``
    for ``wk``.
    """
    rows, cols = weight.shape
    d_head = rows // n_heads
    # (head, pair, 2, d_model) -> (head, 2, pair, d_model): evens first, then odds
    return weight.view(n_heads, d_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_state_dict(
    meta: dict[str, Tensor], params: MetaParams, *, source: str = "Meta checkpoint"
) -> tuple[dict[str, Tensor], int, int]:
    """Rename, permute and shape-check a merged Meta state dict into HF ``LlamaForCausalLM`` names.

    Returns ``(hf_state_dict, vocab_size, d_mlp)``; both sizes are read from the weights and checked
    against ``params``. Raises ``ValueError`` naming the tensor whose shape is wrong.
    """
    d_head, dim = params.d_head, params.dim
    if "layers.0.feed_forward.w1.weight" not in meta:
        raise ValueError(f"{source} has no layers.0.feed_forward.w1.weight; cannot infer d_mlp")
    d_mlp = meta["layers.0.feed_forward.w1.weight"].shape[0]
    expected_d_mlp = params.expected_d_mlp()
    if expected_d_mlp is not None and expected_d_mlp != d_mlp:
        raise ValueError(
            f"{source}: feed_forward.w1 has {d_mlp} rows but params.json (dim={dim}, multiple_of="
            f"{params.multiple_of}, ffn_dim_multiplier={params.ffn_dim_multiplier}) gives "
            f"{expected_d_mlp}"
        )
    vocab_size = meta["tok_embeddings.weight"].shape[0]
    if params.vocab_size is not None and params.vocab_size != vocab_size:
        raise ValueError(
            f"{source}: params.json vocab_size={params.vocab_size} but tok_embeddings has "
            f"{vocab_size} rows"
        )
    layers = sorted({int(m.group(1)) for m in map(_LAYER_KEY.match, meta) if m})
    if layers != list(range(params.n_layers)):
        raise ValueError(
            f"{source}: params.json n_layers={params.n_layers} but the weights hold layers {layers}"
        )
    if "rope.freqs" in meta:
        theta = params.rope_theta
        expected = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
        freqs = meta["rope.freqs"].double()
        if freqs.shape != expected.shape or not torch.allclose(freqs, expected, rtol=1e-2):
            raise ValueError(
                f"{source}: rope.freqs does not match rope_theta={theta} (d_head={d_head}); "
                "set rope_theta in params.json to the value the model was trained with"
            )

    expected_shapes = {
        "tok_embeddings.weight": (vocab_size, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab_size, dim),
    }
    for layer in range(params.n_layers):
        m = f"layers.{layer}."
        expected_shapes |= {
            m + "attention.wq.weight": (params.n_heads * d_head, dim),
            m + "attention.wk.weight": (params.n_kv_heads * d_head, dim),
            m + "attention.wv.weight": (params.n_kv_heads * d_head, dim),
            m + "attention.wo.weight": (dim, params.n_heads * d_head),
            m + "feed_forward.w1.weight": (d_mlp, dim),
            m + "feed_forward.w2.weight": (dim, d_mlp),
            m + "feed_forward.w3.weight": (d_mlp, dim),
            m + "attention_norm.weight": (dim,),
            m + "ffn_norm.weight": (dim,),
        }
    for name, shape in expected_shapes.items():
        if name not in meta:
            raise ValueError(f"{source} is missing tensor {name}")
        if tuple(meta[name].shape) != shape:
            raise ValueError(
                f"{source}: merged {name} has shape {tuple(meta[name].shape)}, expected {shape} "
                "from params.json (a shard from another model mixed in?)"
            )

    hf = {}
    for hf_name, meta_name in hf_to_meta_names(params.n_layers).items():
        hf[hf_name] = to_hf_rows(hf_name, meta[meta_name], params)
    return hf, vocab_size, d_mlp


# transformers name -> Meta name, per layer (under model.layers.<l>. and layers.<l>.)
_HF_TO_META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def hf_to_meta_names(n_layers: int) -> dict[str, str]:
    """Every transformers ``LlamaForCausalLM`` tensor name -> its name in Meta's shards."""
    names = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    for layer in range(n_layers):
        for hf_name, meta_name in _HF_TO_META_LAYER.items():
            names[f"model.layers.{layer}.{hf_name}"] = f"layers.{layer}.{meta_name}"
    return names


def to_hf_rows(hf_name: str, weight: Tensor, params: MetaParams) -> Tensor:
    """``weight`` with q/k rows permuted to transformers' rotate-half order; others unchanged."""
    if hf_name.endswith("q_proj.weight"):
        return permute_rotary_rows(weight, params.n_heads)
    if hf_name.endswith("k_proj.weight"):
        return permute_rotary_rows(weight, params.n_kv_heads)
    return weight


class MetaReader(CheckpointReader):
    """A Meta-layout directory read one merged, permuted tensor at a time.

    The shards are memory-mapped; reading a tensor concatenates its slices from every shard, then
    releases their pages (:func:`lens_attn.loading.readers.release_pages`). ``config`` is the
    equivalent Hugging Face config, ``shapes`` every tensor's merged shape (checked against
    params.json on opening).
    """

    def __init__(self, directory: str | Path) -> None:
        from transformers import LlamaConfig

        self.source = f"Meta checkpoint {directory}"
        self.params = read_meta_params(directory)
        self._shards = open_meta_shards(directory, self.params.dim)
        stand_ins = merge_meta_shards(self._shards, materialize=False)
        hf, vocab_size, d_mlp = meta_to_hf_state_dict(stand_ins, self.params, source=self.source)
        self.shapes = {name: tuple(tensor.shape) for name, tensor in hf.items()}
        raw = hf_config_dict(self.params, vocab_size=vocab_size, d_mlp=d_mlp)
        self.config = LlamaConfig.from_dict(raw)
        self._names = hf_to_meta_names(self.params.n_layers)

    def _read(self, name: str, dtype: torch.dtype) -> Tensor:
        meta_name = self._names[name]
        parts = [shard[meta_name] for shard in self._shards]
        dim = _split_dim(meta_name)
        if dim is None or len(parts) == 1:
            merged = parts[0].to(dtype, copy=True)
        else:
            merged = torch.cat(parts, dim=dim).to(dtype)
        for part in parts:
            release_tensor_pages(part)
        return to_hf_rows(name, merged, self.params).contiguous()

    def close(self) -> None:
        self._shards = []


def hf_config_dict(params: MetaParams, *, vocab_size: int, d_mlp: int) -> dict:
    """The ``config.json`` contents of the equivalent Hugging Face ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": params.dim,
        "intermediate_size": d_mlp,
        "num_hidden_layers": params.n_layers,
        "num_attention_heads": params.n_heads,
        "num_key_value_heads": params.n_kv_heads,
        "head_dim": params.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": params.max_seq_len,
        "rms_norm_eps": params.norm_eps,
        "rope_theta": params.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def find_meta_tokenizer(directory: str | Path) -> Path | None:
    """``tokenizer.model`` next to ``params.json``, else one level up (Meta's download layout)."""
    directory = Path(directory)
    for candidate in (directory / "tokenizer.model", directory.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def read_meta_checkpoint(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """Read a Meta-layout directory as ``(hf_config_dict, hf_state_dict)``.

    The state dict has transformers' ``LlamaForCausalLM`` names and rotate-half q/k rows, in the
    dtype the shards were saved in (bfloat16 for Meta's releases).
    """
    params = read_meta_params(directory)
    meta = load_meta_state_dict(directory, params)
    hf, vocab_size, d_mlp = meta_to_hf_state_dict(
        meta, params, source=f"Meta checkpoint {directory}"
    )
    return hf_config_dict(params, vocab_size=vocab_size, d_mlp=d_mlp), hf


def convert_meta_to_hf(meta_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Meta-layout checkpoint as a Hugging Face directory (config, safetensors, tokenizer).

    Useful once per model: the HF directory then loads without re-merging shards, and it is the only
    input ``load_model(..., backend="bridge", n_devices>1)`` accepts for a multi-GPU bridge.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    config, state = read_meta_checkpoint(meta_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # safetensors refuses tensors that share memory or are non-contiguous views
    save_file(
        {name: t.contiguous().clone() for name, t in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    tokenizer_model = find_meta_tokenizer(meta_dir)
    if tokenizer_model is not None:
        from transformers import LlamaTokenizer

        shutil.copy(tokenizer_model, out / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(str(out), local_files_only=True)
        tokenizer.save_pretrained(str(out))  # adds tokenizer.json and tokenizer_config.json
    return out
