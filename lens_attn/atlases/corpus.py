"""Corpus reading and windowing for the head atlas.

    texts = read_corpus("notes.txt")            # one text: the whole file
    texts = read_corpus("docs/")                # one text per .txt file, sorted by name
    texts = read_corpus("data.jsonl")           # one text per line's "text" field
    texts = read_corpus("saved_dataset/")       # a ``datasets`` dataset saved with save_to_disk

``read_corpus`` returns a lazy iterable: files are opened one at a time and a ``.jsonl`` file is read
line by line, so a corpus is never held in memory whole. ``default_corpus()`` is the corpus the atlas
uses when none is given: generated offline, without a download (see its docstring).

Windows. A text is tokenized as ``model.to_tokens(text)`` does (BOS prepended where the model prepends
it). A text longer than the window is cut into consecutive, non-overlapping windows; every window after
the first starts with a fresh BOS (where the model uses one) followed by the next ``window - 1`` tokens
of the text, so each window looks like the start of a text to the model. That added BOS is not a
position of the text and is never recorded as an example. ``Window.start`` maps a window position back
to ``query_pos`` in the text's own tokens.
"""

import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from lens_attn.errors import InputError


@dataclass(frozen=True)
class Window:
    """A stretch of one text's tokens, as one row of a batch.

    ``tokens[i]`` is the text's token ``start + i - offset``; positions ``i < offset`` are an added
    BOS (``offset`` is 1 for a window after the first when the model prepends BOS, else 0).
    """

    doc: int  # index of the text in input order
    start: int  # query_pos (in the text's own tokens) of window position ``offset``
    offset: int  # positions at the start of the window that are not the text's (an added BOS)
    tokens: Int[Tensor, " pos"]

    def query_pos(self, pos: int) -> int:
        return self.start + pos - self.offset


# ------------------------------------------------------------------------------------ reading


def read_corpus(path: "str | os.PathLike") -> Iterable[str]:
    """The texts of a corpus at ``path``, lazily (see the module docstring for what is accepted)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--corpus: {path} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _Lazy(_read_dataset, path)
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InputError(
                f"--corpus: {path} holds no .txt files; give a text file, a folder of .txt files, "
                "a .jsonl file with a 'text' field, or a saved `datasets` dataset"
            )
        return _Lazy(_read_files, files)
    if path.suffix.lower() == ".jsonl":
        return _Lazy(_read_jsonl, path)
    return _Lazy(_read_files, [path])


class _Lazy:
    """A re-iterable lazy sequence of texts: ``reader(arg)`` is called on each iteration."""

    def __init__(self, reader, arg):
        self.reader, self.arg = reader, arg

    def __iter__(self) -> Iterator[str]:
        return self.reader(self.arg)


def _read_files(files: list[Path]) -> Iterator[str]:
    from lens_attn.validation import read_text_file

    for file in files:
        yield read_text_file(file, what="--corpus:")


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"--corpus: {path} line {number} is not JSON: {err}") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise InputError(
                        f"--corpus: {path} line {number} has no string field 'text' "
                        '(each line must be a JSON object like {"text": "..."})'
                    )
                yield record["text"]
        except UnicodeDecodeError as err:
            raise InputError(f"--corpus: {path} is not UTF-8 text: {err}") from None


def _read_dataset(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"--corpus: {path} looks like a saved `datasets` dataset, but the datasets package "
            "is not installed (pip install datasets)"
        ) from None
    data = datasets.load_from_disk(str(path))
    splits = (
        [data[name] for name in sorted(data)] if isinstance(data, datasets.DatasetDict) else [data]
    )
    for split in splits:
        if "text" not in split.column_names:
            raise InputError(
                f"--corpus: the dataset at {path} has no 'text' column (it has "
                f"{', '.join(split.column_names)})"
            )
        for record in split:
            yield record["text"]


# ---------------------------------------------------------------------------------- windowing


def iter_windows(model, texts: Iterable[str], window: int) -> Iterator[Window]:
    """Every window of every text, in order (see the module docstring)."""
    prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    bos = model.tokenizer.bos_token_id if prepend_bos and model.tokenizer is not None else None
    for doc, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{doc}] is a {type(text).__name__}; give strings")
        tokens = model.to_tokens(text, truncate=False)[0].cpu()
        if len(tokens) < 2:
            continue  # nothing attends to anything: no query position to record
        yield Window(doc, 0, 0, tokens[:window])
        step = window - (1 if bos is not None else 0)
        for begin in range(window, len(tokens), step):
            chunk = tokens[begin : begin + step]
            if bos is not None:
                chunk = torch.cat([torch.tensor([bos], dtype=tokens.dtype), chunk])
            yield Window(doc, begin, 1 if bos is not None else 0, chunk)


# ----------------------------------------------------------------------------- default corpus


def default_corpus(*, seed: int = 0, n_topics: int = 48, n_repeats: int = 48) -> list[str]:
    """A corpus generated offline, without a download, large enough to show the known heads.

    * the 32 texts shipped for the probes (``lens_attn/data/natural_prompts.json``);
    * ``n_topics`` sections of Python's own documentation (``pydoc_data.topics``, part of the
      standard library: natural English about code, full of repeated names), each cut to 3000
      characters;
    * ``n_repeats`` texts with a repeated span, as natural text repeats itself (a refrain, a quoted
      sentence): a few shipped sentences, then one of them again, verbatim. Induction heads attend
      from the second copy to the token after the first.

    Seeded: the same ``seed`` gives the same corpus. About 40 000 tokens under a Llama tokenizer.
    """
    from pydoc_data.topics import topics

    from lens_attn.probes import natural_prompts

    rng = random.Random(seed)
    prompts = natural_prompts()
    texts = list(prompts)
    names = sorted(topics)
    for name in sorted(rng.sample(names, min(n_topics, len(names)))):
        texts.append(topics[name][:3000])
    sentences = [
        s.strip().rstrip(".") + "." for p in prompts for s in p.split(". ") if len(s.split()) >= 5
    ]
    for _ in range(n_repeats):
        chosen = rng.sample(sentences, 4)
        repeated = rng.choice(chosen[:3])
        texts.append(" ".join([*chosen, repeated]))
    return texts
