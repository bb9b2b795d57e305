"""Probe inputs that make head types visible, and padding of token sequences into a batch.

Four kinds of probe ship with the package, all seeded:

- ``repeated_random``: ``[BOS, r_1..r_n, r_1..r_n]`` with ``r`` drawn uniformly from the vocabulary away
  from the special tokens; the second copy is where induction heads attend to ``r_{i+1}``'s first copy.
  Two periods (23 and 41 by default) so a fixed positional offset cannot pass for induction.
- ``natural``: English prompts from ``data/natural_prompts.json`` (previous-token heads, attention sinks).
- ``repeated_tokens``: random tokens drawn from a small pool, so many tokens recur (duplicate-token heads).
- ``ioi``: indirect-object sentences ("When Mary and John went to the store, John gave a drink to")
  with their answers (``Probe.answers``: Mary, John), the task Wang et al. 2022 found duplicate-token
  heads working in; confirm's test of that label, not scored.
- ``retrieval``: a needle of random tokens hidden in a haystack of random tokens and repeated at the
  end, ``[BOS, hay, needle, hay, needle]`` (Wu et al. 2024's needle-in-a-haystack copy-paste, in
  context); ``period`` is the position before the second needle, as for ``repeated_random``.
- ``ordinal``: runs of an ordinal sequence (" Monday Tuesday Wednesday ...", " 3 4 5 6"), the task
  successor heads serve (Gould et al. 2023); confirm's test of ``successor``, not scored.

A probe is one token sequence (BOS first). ``pad`` right-pads sequences into a batch: with causal
attention a real query never sees a padded key, so each row's pattern equals running that prompt alone.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lens_attn.errors import InputError

ProbeKind = Literal[
    "repeated_random", "natural", "repeated_tokens", "ioi", "ordinal", "retrieval", "prompt"
]
DATA = Path(__file__).parent / "data"
DEFAULT_SEED = 0
DEFAULT_PERIODS = (23, 41)


@dataclass(frozen=True)
class Probe:
    """One probe: ``tokens`` is ``[pos]`` with BOS first; ``period`` is set for repeated sequences,
    ``answers`` (correct, incorrect token ids, for ``metric="logit_diff"``) for ``ioi`` probes."""

    kind: ProbeKind
    tokens: Int[Tensor, " pos"]
    period: int | None = None
    answers: tuple[int, int] | None = None


def _special_ids(tokenizer) -> set[int]:
    """Every id ``tokenizer`` treats as special: its named special tokens and added tokens marked
    special (SmolLM2's ids 3-16, Llama 3's reserved ids 128000+ are only the latter)."""
    ids = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    ids |= set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return {i for i in ids if i is not None}


def _random_ids(model) -> Tensor:
    """The sorted token ids random probes draw from: every id with an embedding row and a token in
    the tokenizer, except the special ones (no tokenizer: Llama's 0, 1, 2)."""
    tokenizer = model.tokenizer
    n_ids = model.cfg.d_vocab if tokenizer is None else min(model.cfg.d_vocab, len(tokenizer))
    specials = _special_ids(tokenizer) if tokenizer is not None else {0, 1, 2}
    allowed = torch.tensor(sorted(set(range(n_ids)) - specials), dtype=torch.long)
    if len(allowed) < 2:
        raise ValueError(f"the vocabulary has {len(allowed)} non-special tokens; probes need >= 2")
    return allowed


def _random_range(model) -> tuple[int, int] | None:
    """[low, high) if the non-special ids are one contiguous range (Llama 2: 3..d_vocab), else None."""
    allowed = _random_ids(model)
    low, high = int(allowed[0]), int(allowed[-1]) + 1
    return (low, high) if high - low == len(allowed) else None


def _draw(model, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform non-special token ids; the same draws as ``randint(low, high)`` for a contiguous range."""
    contiguous = _random_range(model)
    if contiguous is not None:
        return torch.randint(*contiguous, size, generator=generator)
    allowed = _random_ids(model)
    return allowed[torch.randint(0, len(allowed), size, generator=generator)]


def _bos_id(model) -> int:
    """BOS as the tokenizer defines it (Llama 2: ``<s>`` = 1; SmolLM2: ``<|im_start|>`` = 1)."""
    tokenizer = model.tokenizer
    if tokenizer is None or tokenizer.bos_token_id is None:
        return 1  # Llama's <s>
    return int(tokenizer.bos_token_id)


def bos_info(model) -> dict:
    """What ``run.json`` records of BOS: the token probes start with and whether prompts get it."""
    tokenizer = model.tokenizer
    bos_id = _bos_id(model)
    token = tokenizer.convert_ids_to_tokens(bos_id) if tokenizer is not None else None
    return {
        "bos_token": token,
        "bos_token_id": bos_id,
        "prompts_prepend_bos": bool(getattr(model.cfg, "default_prepend_bos", True)),
    }


def induction_probes(
    model,
    *,
    periods: tuple[int, ...] = DEFAULT_PERIODS,
    n_per_period: int = 16,
    seed: int = DEFAULT_SEED,
) -> list[Probe]:
    """Repeated random-token sequences ``[BOS, r_1..r_n, r_1..r_n]``, ``n_per_period`` for each period."""
    bos = _bos_id(model)
    probes = []
    for period in periods:
        if period < 2:
            raise ValueError(f"period must be >= 2, got {period}")
        g = torch.Generator().manual_seed(seed * 1000 + period)
        r = _draw(model, (n_per_period, period), g)
        for row in r:
            probes.append(
                Probe("repeated_random", torch.cat([torch.tensor([bos]), row, row]), period)
            )
    return probes


def repeated_token_probes(
    model, *, n: int = 16, length: int = 48, pool: int = 20, seed: int = DEFAULT_SEED
) -> list[Probe]:
    """Random tokens drawn with replacement from a pool of ``pool`` ids, so most tokens recur."""
    allowed = _random_ids(model)
    bos = _bos_id(model)
    g = torch.Generator().manual_seed(seed * 1000 + 7)
    probes = []
    for _ in range(n):
        vocab = allowed[torch.randperm(len(allowed), generator=g)[:pool]]
        body = vocab[torch.randint(0, pool, (length - 1,), generator=g)]
        probes.append(Probe("repeated_tokens", torch.cat([torch.tensor([bos]), body])))
    return probes


# Wang et al. 2022's IOI sentences: {A} is the indirect object (the answer), {B} the subject, named
# twice; the second {B} is where duplicate-token heads attend back to the first
IOI_TEMPLATES = (
    "When{A} and{B} went to the store,{B} gave a drink to",
    "Then,{A} and{B} had a long argument. Afterwards{B} said to",
    "After{A} and{B} went to the park,{B} gave a ball to",
    "While{A} and{B} were working at the office,{B} handed the report to",
    "Friends{A} and{B} found a bag at the garden.{B} gave it to",
    "When{A} and{B} got a snack at the house,{B} decided to give it to",
)
IOI_NAMES = (" Mary", " John", " Tom", " Anna", " James", " Sarah", " David", " Emma", " Mike",
             " Lisa", " Paul", " Kate", " Ben", " Lily", " Sam", " Tim")  # fmt: skip


def ioi_probes(model, *, n: int = 48, seed: int = DEFAULT_SEED) -> list[Probe]:
    """``n`` IOI sentences, the templates in turn, each with two different names drawn at random.

    Only names that end a sentence as exactly one token are used (``answers`` holds those tokens:
    the indirect object, then the subject). ``[]`` when the vocabulary has fewer than two such
    names or the context can't hold the sentences: confirm then tests duplicate-token heads on
    repeated tokens instead.
    """
    g = torch.Generator().manual_seed(seed * 1000 + 11)
    usable = _one_token_names(model)
    probes: list[Probe] = []
    if len(usable) < 2:
        return probes
    names = list(usable)
    for i in range(n):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        a, b = (names[j] for j in torch.randperm(len(names), generator=g)[:2].tolist())
        tokens = model.to_tokens(template.format(A=a, B=b), truncate=False)[0].cpu()
        if len(tokens) + 1 > model.cfg.n_ctx:
            return []
        probes.append(Probe("ioi", tokens, answers=(usable[a], usable[b])))
    return probes


def _one_token_names(model) -> dict[str, int]:
    """``{name: token id}`` for the ``IOI_NAMES`` that end the first template as exactly one token."""
    if model.tokenizer is None:
        return {}
    sentence = IOI_TEMPLATES[0].format(A=IOI_NAMES[0], B=IOI_NAMES[1])
    base = model.to_tokens(sentence, truncate=False)[0].tolist()
    out = {}
    for name in IOI_NAMES:
        full = model.to_tokens(sentence + name, truncate=False)[0].tolist()
        if len(full) == len(base) + 1 and full[: len(base)] == base:
            out[name] = full[-1]
    return out


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")  # fmt: skip
ORDINAL_WORDS: tuple[tuple[str, ...], ...] = (  # Gould et al. 2023's ordinal tasks
    DAYS,
    MONTHS,
    tuple(str(i) for i in range(1, 21)),
    ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
)
ORDINAL_SPELLINGS = (str, lambda w: " " + w, str.lower, lambda w: " " + w.lower())


def ordinal_sequences(tokenizer, *, spellings=ORDINAL_SPELLINGS) -> list[list[int]]:
    """The ordinal sequences (``ORDINAL_WORDS`` in each of ``spellings``) as one-token ids, each cut
    at its first word that is not a single token; sequences shorter than 3 are dropped."""
    sequences: list[list[int]] = []
    for words in ORDINAL_WORDS:
        for spell in spellings:
            ids: list[int] = []
            for word in words:
                piece = tokenizer.encode(spell(word), add_special_tokens=False)
                if len(piece) != 1:
                    break
                ids.append(piece[0])
            if len(ids) >= 3 and len(set(ids)) == len(ids) and ids not in sequences:
                sequences.append(ids)
    return sequences


def ordinal_probes(model, *, n: int = 32, length: int = 6, seed: int = DEFAULT_SEED) -> list[Probe]:
    """``n`` runs ``[BOS, s_i .. s_{i+length-1}]`` of the ordinal sequences spelled with a leading
    space (as in running text), drawn in turn with a random start; ``[]`` without a tokenizer or
    any sequence of at least ``length`` one-token words."""
    if model.tokenizer is None:
        return []
    spaced = (lambda w: " " + w, lambda w: " " + w.lower())
    sequences = [
        s for s in ordinal_sequences(model.tokenizer, spellings=spaced) if len(s) >= length
    ]
    if not sequences:
        return []
    g = torch.Generator().manual_seed(seed * 1000 + 13)
    bos = _bos_id(model)
    probes = []
    for i in range(n):
        seq = sequences[i % len(sequences)]
        start = int(torch.randint(0, len(seq) - length + 1, (1,), generator=g))
        probes.append(Probe("ordinal", torch.tensor([bos, *seq[start : start + length]])))
    return probes


RETRIEVAL_NEEDLE = 10  # tokens in a retrieval probe's needle


def retrieval_probes(
    model, *, n: int = 8, length: int = 128, seed: int = DEFAULT_SEED
) -> list[Probe]:
    """``n`` probes ``[BOS, hay_1, needle, hay_2, needle]`` of ``length`` tokens (cut to the
    context): random haystack tokens, a random needle of ``RETRIEVAL_NEEDLE`` tokens at a random
    depth, and the needle again at the end. ``period`` = the position just before the second
    needle, so ``induction_loss`` reads exactly the needle's copy-paste (tokens 2..).

    128 tokens, not 200: the haystack is most of what confirm's retrieval test costs (it was 37%
    of discover's ablations on SmolLM2 at 200), and SmolLM2's retrieval heads are the same at
    both lengths but one (200: 17 heads; 128: 16 of them, L23H0 out and L24H6 in)."""
    length = min(length, model.cfg.n_ctx)
    m = RETRIEVAL_NEEDLE
    if length < 3 * m:
        return []
    g = torch.Generator().manual_seed(seed * 1000 + 17)
    bos = _bos_id(model)
    probes = []
    for _ in range(n):
        body = _draw(model, (length - 1 - m,), g)  # hay_1 + needle + hay_2
        needle = body[-m:].clone()
        hay = body[:-m]
        depth = int(torch.randint(0, len(hay) - m, (1,), generator=g))
        tokens = torch.cat([torch.tensor([bos]), hay[:depth], needle, hay[depth:], needle])
        probes.append(Probe("retrieval", tokens[:length], period=length - m - 1))
    return probes


def natural_prompts() -> list[str]:
    """The shipped natural-text prompts (see ``data/natural_prompts.json`` for their source)."""
    return json.loads((DATA / "natural_prompts.json").read_text(encoding="utf-8"))["prompts"]


def prompt_probes(model, prompts: list[str], *, kind: ProbeKind = "prompt") -> list[Probe]:
    """Tokenize prompts as ``model.to_tokens(prompt)`` does, one probe each.

    BOS is prepended unless the model was loaded with ``default_prepend_bos=False``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("the prompt list is empty; give at least one prompt")
    check_tokenizer(model, "text prompts")
    probes = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"prompt {i} is empty; every prompt needs at least one non-space character"
            )
        # the model's default_prepend_bos decides BOS; never cut silently
        tokens = model.to_tokens(prompt, truncate=False)
        probes.append(Probe(kind, tokens[0].cpu()))
    return probes


def builtin_probes(model, *, seed: int = DEFAULT_SEED) -> list[Probe]:
    """The default probe set: 32 repeated random, 32 natural and 16 repeated-token sequences.

    On a model whose context can't hold ``[BOS, r, r]`` at the default periods (23, 41), the periods
    shrink to fit (``(n_ctx - 1) // 2`` and two thirds of it), and natural prompts are cut to ``n_ctx``.
    """
    check_tokenizer(
        model, "the default probes (their natural-text prompts)",
        also="or lens_attn.induction_probes(model), random token ids that need no tokenizer",
    )  # fmt: skip
    longest = (model.cfg.n_ctx - 1) // 2
    periods = (
        DEFAULT_PERIODS if max(DEFAULT_PERIODS) <= longest else (max(2, 2 * longest // 3), longest)
    )
    return (
        induction_probes(model, periods=periods, seed=seed)
        + [
            Probe("natural", p.tokens[: model.cfg.n_ctx])
            for p in prompt_probes(model, natural_prompts(), kind="natural")
        ]
        + repeated_token_probes(model, seed=seed)
    )


def check_tokenizer(model, what: str, *, also: str = "") -> None:
    """Refuse ``what`` in one line when ``model`` has no tokenizer to turn text into ids."""
    if getattr(model, "tokenizer", None) is None:
        raise InputError(
            f"this model has no tokenizer, so {what} can't be tokenized: pass tokens instead "
            f"(a [batch, pos] tensor of ids{', ' + also if also else ''}), or set model.tokenizer"
        )


def group_by_kind(probes: list[Probe]) -> dict[str, list[Probe]]:
    """``{kind: [probes of that kind]}`` in first-seen order."""
    sets: dict[str, list[Probe]] = {}
    for probe in probes:
        sets.setdefault(probe.kind, []).append(probe)
    return sets


def as_probes(model, prompts_or_probes) -> list[Probe]:
    """Accept probes, strings, or a ``[batch, pos]`` token tensor (no padding) and return probes.

    A token tensor must hold integer ids in ``0 .. d_vocab - 1`` (``InputError`` otherwise).
    """
    if prompts_or_probes is None:
        return builtin_probes(model)
    if isinstance(prompts_or_probes, str):
        prompts_or_probes = [prompts_or_probes]
    if isinstance(prompts_or_probes, Tensor):
        if prompts_or_probes.ndim != 2 or prompts_or_probes.shape[0] == 0:
            raise ValueError(
                f"tokens must be [batch, pos] with batch >= 1, got {tuple(prompts_or_probes.shape)}"
            )
        from lens_attn.validation import check_token_ids

        check_token_ids(prompts_or_probes, model.cfg.d_vocab)  # InputError: dtype or id range
        return [Probe("prompt", row.cpu()) for row in prompts_or_probes]
    items = list(prompts_or_probes)
    if not items:
        raise ValueError("the prompt list is empty; give at least one prompt or probe")
    if all(isinstance(p, Probe) for p in items):
        return items
    if all(isinstance(p, str) for p in items):
        return prompt_probes(model, items)
    raise TypeError(
        "expected a list of str prompts, a list of Probe, or a [batch, pos] token tensor"
    )


def check_context(model, probes: list[Probe]) -> None:
    """Refuse a probe longer than the model's context, naming the limit."""
    longest = max(len(p.tokens) for p in probes)
    if longest > model.cfg.n_ctx:
        raise ValueError(
            f"a probe has {longest} tokens but the model's context is n_ctx={model.cfg.n_ctx}; "
            "shorten the prompt"
        )


def pad(
    probes: list[Probe], *, pad_id: int = 0
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Right-pad probes into ``tokens`` and a ``mask`` that is True on real tokens."""
    length = max(len(p.tokens) for p in probes)
    tokens = torch.full((len(probes), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(probes), length), dtype=torch.bool)
    for i, p in enumerate(probes):
        tokens[i, : len(p.tokens)] = p.tokens
        mask[i, : len(p.tokens)] = True
    return tokens, mask


def str_tokens(model, tokens: Int[Tensor, " pos"]) -> list[str]:
    """Readable token strings, keeping SentencePiece's word boundaries: ``▁capital`` -> ``" capital"``.

    TransformerLens's ``to_str_tokens`` decodes token by token, and a Llama tokenizer drops the leading
    space of each piece when decoding alone, so words would run together in figures and reports.
    Byte-fallback pieces such as ``<0x0A>`` become their character when it is ASCII.
    """
    ids = [int(t) for t in tokens]
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:  # a model built from a config: label tokens by id
        return [f"#{i}" for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else None
    if not pieces or not any(isinstance(p, str) and "▁" in p for p in pieces):
        return list(model.to_str_tokens(torch.tensor(ids)))
    out = []
    for piece in pieces:
        if piece is None:
            piece = ""
        elif (
            len(piece) == 6
            and piece.startswith("<0x")
            and piece.endswith(">")
            and int(piece[3:5], 16) < 128
        ):
            piece = chr(int(piece[3:5], 16))
        out.append(piece.replace("▁", " "))
    return out


def probe_hash(probes: list[Probe]) -> str:
    """A short content hash of a probe set, for provenance."""
    h = hashlib.sha256()
    for p in probes:
        h.update(p.kind.encode())
        h.update(p.tokens.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def pad_token_id(model) -> int:
    """The id padded positions hold: the tokenizer's pad token, else 0 (masked out either way)."""
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return 0
