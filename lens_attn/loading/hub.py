"""TransformerLens model names and the local Hugging Face cache: which names are Llama-family,
whether their weights are cached, and one clear error when they are not and the hub can't be reached.

``lens_attn.loading`` uses these for ``load_model("meta-llama/Llama-2-7b-hf")``; nothing here builds a
model.
"""

import difflib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

# TransformerLens 3.9's ``loading_from_pretrained.NON_HF_HOSTED_MODEL_NAMES`` (LLaMA 1: Meta's weights
# only). TransformerLens 4 removed that module; its OFFICIAL_MODEL_NAMES are unchanged.
NON_HF_HOSTED_MODEL_NAMES = ("llama-7b-hf", "llama-13b-hf", "llama-30b-hf", "llama-65b-hf")


def _alias_map() -> dict[str, str]:
    """Lower-cased official name or alias -> official name (3.9's ``make_model_alias_map``)."""
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    alias_map = {}
    for official in OFFICIAL_MODEL_NAMES:
        for alias in MODEL_ALIASES.get(official, []):
            alias_map[alias.lower()] = official
        alias_map[official.lower()] = official
    return alias_map


class ModelNotCachedError(FileNotFoundError):
    """A TransformerLens model name whose weights are not in the local Hugging Face cache and could
    not be downloaded (offline mode, no network, or a gated repo without a token)."""


def llama_model_names() -> list[str]:
    """TransformerLens's official Llama-family names that live on the Hugging Face Hub."""
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

    return sorted(
        name
        for name in OFFICIAL_MODEL_NAMES
        if "llama" in name.lower() and name not in NON_HF_HOSTED_MODEL_NAMES
    )


def resolve_model_name(name: str) -> str:
    """The official Hub name for a TransformerLens Llama-family name or alias (case-insensitive).

    Unknown names raise ValueError with the closest valid names; names of other families, and
    LLaMA 1 names that are not on the Hub, raise ValueError too.
    """
    from transformer_lens.supported_models import MODEL_ALIASES

    alias_map = _alias_map()  # lower-cased name or alias -> official name
    official = alias_map.get(name.lower())
    family = llama_model_names()
    if official is None:
        choices = {  # lower-cased -> as spelled by TransformerLens
            spelling.lower(): spelling
            for official_name in family
            for spelling in (official_name, *MODEL_ALIASES.get(official_name, []))
        }
        close = [choices[c] for c in difflib.get_close_matches(name.lower(), choices, n=5)]
        hint = f"did you mean {close}? " if close else ""
        raise ValueError(
            f"unknown model {name!r}: not an existing directory and not a TransformerLens model "
            f"name. {hint}Llama-family names: {family}"
        )
    if official in NON_HF_HOSTED_MODEL_NAMES:
        raise ValueError(
            f"{name!r} ({official}, LLaMA 1) is not hosted on the Hugging Face Hub; download "
            "Meta's weights and pass their directory instead"
        )
    if official not in family:
        raise ValueError(
            f"{name!r} is TransformerLens model {official!r}, which is not a Llama-family model; "
            f"lens-attn loads: {family}"
        )
    return official


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    default_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(os.environ.get("HF_HOME", default_home)).expanduser() / "hub"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (flag or "").upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def is_cached(official_name: str, cache_dir: Path | None = None) -> bool:
    """True if the config and some weights of ``official_name`` are in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = cache_dir or hub_cache_dir()

    def cached(filename: str) -> bool:
        found = try_to_load_from_cache(official_name, filename, cache_dir=str(cache_dir))
        return isinstance(found, str)

    weights = (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    )
    return cached("config.json") and any(cached(name) for name in weights)


def _not_cached(name: str, official: str, cache_dir: Path, reason: str) -> ModelNotCachedError:
    return ModelNotCachedError(
        f"the weights of {official!r} (from {name!r}) are not in the local Hugging Face cache "
        f"({cache_dir}) and cannot be downloaded: {reason}. Download them once with network "
        f"access (e.g. `hf download {official}`; Llama repos are gated, so `hf auth login` "
        "first), or pass a local directory to load_model: a Hugging Face directory (config.json "
        "+ safetensors) or Meta's layout (params.json + consolidated.NN.pth)"
    )


@contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """huggingface_hub's offline flag, for one load. ``local_files_only`` alone still lets the
    hub client fetch its user-agent registry from huggingface.co (huggingface_hub 2.4)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached, or None. One TCP connect, instead of the hub client's ~45 s
    of retries before it gives up."""

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"no network: cannot reach {url.hostname}:{port} ({err})"
    return None
