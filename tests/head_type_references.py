"""Independent measurements of the literature's head types, written with transformers only.

Nothing here imports lens-attn: the model is transformers' ``LlamaForCausalLM`` (eager attention),
the tokens are drawn here, and every formula is written out from its paper. The tests and
``experiments/label_accuracy.py`` compare lens-attn's labels with these (precision and recall).

Weight-based tests read a head's OV circuit on the *effective embedding*: the residual stream after
layer 0 on a one-token input (no BOS), so layer 0's attention sees the token alone and its MLP has
run (McDougall et al. 2023, "Copy Suppression", section 3; Wang et al. 2022 use layer 0's MLP output
the same way). The head reads it through its layer's input RMSNorm; its output goes through the
final RMSNorm and ``lm_head``.

- ``ov_rank_shares``: the share of tokens whose own logit is among the top ``k`` (copying) or the
  bottom ``k`` (copy suppression) of the head's OV row, over the whole vocabulary (McDougall et al.
  2023; Wang et al. 2022's copy score).
- ``successor_scores``: Gould et al. 2023, "Successor Heads": for each ordinal token (numbers, days,
  months, letters) the head's OV row restricted to its sequence's tokens; a hit when the successor
  has the largest logit; the score is the share of hits.
- ``offset_attention``: the attention at a fixed offset ``q - k`` on text, rows pooled (previous-n
  heads).
"""

import torch

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")  # fmt: skip
NUMBERS = tuple(str(i) for i in range(1, 21))
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def load_hf(source) -> tuple:
    """``(LlamaForCausalLM, tokenizer)`` from an HF directory or a .gguf file, float32, eager."""
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaForCausalLM

    source = Path(source).expanduser()
    where = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    directory = source.parent if where else source
    model = LlamaForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, **where
    ).eval()
    return model, AutoTokenizer.from_pretrained(directory, **where)


def random_tokens(hf, tok, n: int, *, seed: int) -> torch.Tensor:
    """``n`` distinct random ids above the special ids (seeded)."""
    low = max([i for i in tok.all_special_ids if i < 1000] + [2]) + 1
    g = torch.Generator().manual_seed(seed)
    return low + torch.randperm(hf.config.vocab_size - low, generator=g)[:n]


@torch.no_grad()
def effective_embedding(hf, ids: torch.Tensor) -> torch.Tensor:
    """``[n, d_model]``: the residual after layer 0 on each token alone (no BOS)."""
    out = hf.model(input_ids=ids[:, None], output_hidden_states=True)
    return out.hidden_states[1][:, 0]


@torch.no_grad()
def ov_logits(hf, layer: int, head: int, resid: torch.Tensor, vocab=None) -> torch.Tensor:
    """``[n, d_vocab]``: head ``head`` of ``layer``'s OV output on ``resid``, unembedded (on the
    ids ``vocab`` only, if given)."""
    cfg = hf.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    kv = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
    block = hf.model.layers[layer]
    x = block.input_layernorm(resid)
    v = x @ block.self_attn.v_proj.weight[kv * d_head : (kv + 1) * d_head].T  # [n, d_head]
    w_o = block.self_attn.o_proj.weight[
        :, head * d_head : (head + 1) * d_head
    ].T  # [d_head, d_model]
    # the final RMSNorm scales each row by one positive number (no rank changes): only its weight
    # is applied; then through W_O lm_head, a [d_head, d_vocab] product (cheaper for many tokens)
    unembed = hf.lm_head.weight if vocab is None else hf.lm_head.weight[vocab]
    return v @ ((w_o * hf.model.norm.weight) @ unembed.T)


@torch.no_grad()
def ov_rank_shares(hf, ids: torch.Tensor, *, k: int = 10, heads=None) -> dict[str, torch.Tensor]:
    """``{"copy": [layer, head], "suppress": [layer, head]}``: share of ``ids`` whose own logit is
    in the top ``k`` / bottom ``k`` of the head's OV row over the whole vocabulary (NaN for heads
    not in ``heads``)."""
    cfg = hf.config
    shape = (cfg.num_hidden_layers, cfg.num_attention_heads)
    out = {"copy": torch.full(shape, float("nan")), "suppress": torch.full(shape, float("nan"))}
    resid = effective_embedding(hf, ids)
    rows = torch.arange(len(ids))
    wanted = (
        heads if heads is not None else [(a, b) for a in range(shape[0]) for b in range(shape[1])]
    )
    for layer, head in wanted:
        logits = ov_logits(hf, layer, head, resid)
        own = logits[rows, ids][:, None]
        out["copy"][layer, head] = ((logits > own).sum(-1) < k).float().mean()
        out["suppress"][layer, head] = ((logits < own).sum(-1) < k).float().mean()
    return out


def ordinal_sequences(tok) -> list[list[int]]:
    """Each ordinal sequence (with and without a leading space, capitalised or not) as token ids,
    cut at its first word that is not one token."""
    sequences = []
    for words in (DAYS, MONTHS, NUMBERS, NUMBER_WORDS, LETTERS):
        for form in (
            lambda w: w,
            lambda w: " " + w,
            lambda w: w.lower(),
            lambda w: " " + w.lower(),
        ):
            ids = []
            for word in words:
                piece = tok(form(word), add_special_tokens=False)["input_ids"]
                if len(piece) != 1:
                    break
                ids.append(piece[0])
            if len(ids) >= 3 and len(set(ids)) == len(ids) and ids not in sequences:
                sequences.append(ids)
    return sequences


@torch.no_grad()
def successor_scores(hf, tok) -> torch.Tensor:
    """``[layer, head]``: Gould et al.'s succession score on every ordinal sequence of the
    tokenizer: the share of non-final members whose OV row ranks the successor first among the
    sequence's tokens."""
    cfg = hf.config
    sequences = ordinal_sequences(tok)
    hits = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
    total = sum(len(s) - 1 for s in sequences)
    for seq in sequences:
        ids = torch.tensor(seq)
        resid = effective_embedding(hf, ids[:-1])
        for layer in range(cfg.num_hidden_layers):
            for head in range(cfg.num_attention_heads):
                logits = ov_logits(hf, layer, head, resid, ids)
                hits[layer, head] += (logits.argmax(-1) == torch.arange(1, len(seq))).sum()
    return hits / total


@torch.no_grad()
def offset_attention(hf, sequences: list[torch.Tensor], offsets=range(2, 9)) -> torch.Tensor:
    """``[offset, layer, head]``: the attention at ``q - offset``, averaged over every query
    ``q >= offset`` of every sequence (rows pooled; sequences begin with BOS)."""
    cfg = hf.config
    total = torch.zeros(len(offsets), cfg.num_hidden_layers, cfg.num_attention_heads)
    rows = torch.zeros(len(offsets))
    for t in sequences:
        attn = torch.stack([a[0] for a in hf(t[None], output_attentions=True).attentions])
        for i, k in enumerate(offsets):
            q = torch.arange(k, len(t))
            total[i] += attn[:, :, q, q - k].sum(-1)
            rows[i] += len(q)
    return total / rows[:, None, None].clamp_min(1)


@torch.no_grad()
def name_mover_scores(hf, prompts: list[tuple[torch.Tensor, int, int]]) -> dict[str, torch.Tensor]:
    """Wang et al. 2022's name movers on IOI prompts ``(tokens with BOS, io_id, s_id)``:
    ``{"name_mover", "negative_name_mover": [layer, head], "accuracy": share of prompts with
    logit(IO) > logit(S)}``. Per prompt and head, ``a`` = attention from the last token to IO,
    ``d`` = the head's output at the last token (o_proj's input slice times its weight slice) dotted
    with ``norm.weight * (lm_head[IO] - lm_head[S])``; the scores are the means of ``a * [d > 0]``
    and ``a * [d < 0]``, kept only for heads whose mean ``d`` is at least 5% of the sum of every
    head's positive mean ``d`` (for ``a * [d < 0]``: of the negative ones), 0 elsewhere."""
    cfg = hf.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    d_head = cfg.hidden_size // n_heads
    pos = torch.zeros(n_layers, n_heads)
    neg = torch.zeros(n_layers, n_heads)
    effect = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    correct = 0
    for tokens, io, s in prompts:
        captured = {}
        hooks = [
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda mod, args, i=i, store=captured: store.__setitem__(i, args[0][0, -1].clone())
            )
            for i, layer in enumerate(hf.model.layers)
        ]
        try:
            out = hf(tokens[None], output_attentions=True)
        finally:
            for h in hooks:
                h.remove()
        logits = out.logits[0, -1]
        correct += int(logits[io] > logits[s])
        direction = hf.model.norm.weight * (hf.lm_head.weight[io] - hf.lm_head.weight[s])
        io_pos = int((tokens == io).nonzero()[0])
        for layer in range(n_layers):
            attn = out.attentions[layer][0, :, -1, io_pos]  # [head]
            z = captured[layer].reshape(n_heads, d_head)
            w_o = hf.model.layers[layer].self_attn.o_proj.weight  # [d_model, n_heads * d_head]
            for head in range(n_heads):
                d = z[head] @ w_o[:, head * d_head : (head + 1) * d_head].T @ direction
                pos[layer, head] += attn[head] * (d > 0)
                neg[layer, head] += attn[head] * (d < 0)
                effect[layer, head] += float(d)
    n = len(prompts)
    mean_d = effect / n
    out = {"accuracy": correct / n}
    for name, sums, sign in (("name_mover", pos, 1.0), ("negative_name_mover", neg, -1.0)):
        push = [max(0.0, sign * float(x)) for x in mean_d.flatten()]
        keep = torch.tensor([x >= 0.05 * sum(push) for x in push]).reshape(n_layers, n_heads)
        out[name] = torch.where(keep, sums / n, torch.zeros(()))
    return out


@torch.no_grad()
def retrieval_scores(hf, probes: list[tuple[torch.Tensor, int, int]]) -> dict:
    """Wu et al. 2024's retrieval score on teacher-forced needle copies ``(tokens, first, second)``
    (the needle's start positions; it runs to the end): per probe and head, the share of the
    second needle's queries (but its last) whose attention argmax is the first needle's copy of
    the next token; the mean over probes. ``accuracy``: the share of those steps where the model's
    own top-1 prediction is that token (the model retrieves the needle)."""
    cfg = hf.config
    total = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
    hits = steps = 0
    for tokens, first, second in probes:
        out = hf(tokens[None], output_attentions=True)
        m = len(tokens) - second
        q = torch.arange(second, second + m - 1)
        k = torch.arange(first + 1, first + m)
        for layer, attn in enumerate(out.attentions):
            total[layer] += (attn[0][:, q].argmax(-1) == k).float().mean(-1)
        hits += int((out.logits[0, q].argmax(-1) == tokens[q + 1]).sum())
        steps += len(q)
    return {"retrieval": total / len(probes), "accuracy": hits / steps}


# Wang et al. 2022's IOI templates ({A}: the indirect object, {B}: the subject, named twice)
IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {B} gave a drink to",
    "When {A} and {B} went to the park, {B} gave a ball to",
    "Then, {A} and {B} had a long argument. Afterwards {B} said to",
)
NAMES = ("Mary", "John", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Mike", "Lisa", "Paul",
         "Kate", "Ben", "Lily", "Sam", "Tim", "Alice", "Bob")  # fmt: skip


def ioi_prompts(tok, *, n: int = 48, seed: int = 5) -> list[tuple[torch.Tensor, int, int]]:
    """``n`` IOI sentences ``(BOS + ids, io_id, s_id)`` with names that are one token after a
    space (``[]`` if fewer than two are)."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else 1
    names = [(name, tok(" " + name, add_special_tokens=False)["input_ids"]) for name in NAMES]
    names = [(name, ids[0]) for name, ids in names if len(ids) == 1]
    if len(names) < 2:
        return []
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        (a, io), (b, s) = (names[j] for j in torch.randperm(len(names), generator=g)[:2].tolist())
        text = IOI_TEMPLATES[i % len(IOI_TEMPLATES)].format(A=a, B=b)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids.count(io) == 1:
            out.append((torch.tensor([bos, *ids]), io, s))
    return out


def needle_probes(hf, tok, *, n: int = 8, length: int = 200, needle: int = 10, seed: int = 7):
    """``n`` probes ``(BOS + hay + needle + hay + needle, first, second)`` of random tokens, the
    needle at a random depth (``first``/``second``: its two start positions)."""
    length = min(length, hf.config.max_position_embeddings)
    bos = tok.bos_token_id if tok.bos_token_id is not None else 1
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = random_tokens(
            hf, tok, length - 1 - needle, seed=int(torch.randint(0, 2**31, (1,), generator=g))
        )
        hay, pin = ids[: length - 1 - 2 * needle], ids[length - 1 - 2 * needle :]
        depth = int(torch.randint(0, len(hay) - needle, (1,), generator=g))
        tokens = torch.cat([torch.tensor([bos]), hay[:depth], pin, hay[depth:], pin])
        out.append((tokens, 1 + depth, len(tokens) - needle))
    return out
