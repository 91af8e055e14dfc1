"""What the components of a model do on sequence continuation (Paper B: Lan, Torr & Barez 2024).

The analyses of the paper's sections 4-5 that look at one component at a time, on
the prompts of :mod:`mechbook.papers.seqcont.sequences`:

- where the sequence members sit in a prompt (:func:`member_positions`), so that
  attention to them and their residual vectors can be read;
- :func:`single_ablation_effects`: each head and MLP mean-ablated alone, its effect
  on the logit difference in percent of the full model (the paper's "head 7.11:
  -47%");
- :func:`last_position_attention` / :func:`member_attention`: how much the last
  position attends to the members, in order and shuffled;
- :func:`successor_scores`: a head's OV circuit applied to a member's residual
  vector, read through the unembedding: is the *next* member among the top tokens
  (the "successor heads" of Gould et al. 2023, used by the paper for head 9.1);
- :func:`lens_turn_layers`: the layer at which the logit lens at the last
  position switches from the last shown member ("4") to the next one ("5").

Every function returns a tidy DataFrame (or tensors with named shapes) that the
chapters save for the cross-model chapter and draw with
:mod:`mechbook.papers.seqcont.figures`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm

from mechbook.core import decoding
from mechbook.core.architectures import ov_circuit
from mechbook.core.checks import check
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.names import Component, act_name, all_heads, all_mlps
from mechbook.core.patching import (
    Metric,
    ablation_sweep,
    check_whole,
    logit_diff,
    mean_activations,
)
from mechbook.core.runs import (
    TokenBatch,
    chunk_starts,
    run_last,
    run_last_batched,
    tokenize,
)
from mechbook.papers.seqcont.sequences import (
    PAPER_TEMPLATES,
    WORD_SEQUENCES,
    SeqPromptSet,
    filter_solved,
    load_paper_prompts,
    tokenize_prompts,
)

PAPER_CLEAN_TEMPLATES = tuple(PAPER_TEMPLATES)


# --- prompt sets ------------------------------------------------------------------------------


def sample_prompts(prompts: SeqPromptSet, n: int | None, *, seed: int = 0) -> SeqPromptSet:
    """``n`` prompts drawn at random without replacement (kept in file order); all of them if ``n`` is None or larger."""
    if n is None:
        return prompts
    n = check("n_prompts", n, argument="n")
    if n >= len(prompts):
        return prompts
    rng = np.random.default_rng(seed)
    return prompts.select(sorted(rng.choice(len(prompts), size=n, replace=False).tolist()))


def concat_prompts(sets: Sequence[SeqPromptSet]) -> SeqPromptSet:
    """Several tokenized prompt sets of one task as one set (e.g. the three paper templates together)."""
    if not sets:
        raise MechbookError("no prompt sets to join; pass at least one")
    first = sets[0]
    if any(s.task != first.task or s.kind != first.kind for s in sets):
        raise MechbookError("join prompt sets of one task and kind only (got "
                            + ", ".join(sorted({f"{s.task}/{s.kind}" for s in sets})) + ")")
    if any(s.is_tokenized != first.is_tokenized or s.tokenizer_key != first.tokenizer_key for s in sets):
        raise MechbookError("join prompt sets tokenized for the same tokenizer (or none of them tokenized)")
    fields = ("text", "members", "corr", "incorr", "template", "source_index", "prompt_ids", "prompt_text",
              "corr_id", "incorr_id", "corr_n_tokens", "incorr_n_tokens")
    joined = {f: sum((list(getattr(s, f)) for s in sets), []) for f in fields if getattr(first, f) is not None}
    dropped = pd.concat([s.dropped for s in sets], ignore_index=True)
    return replace(first, **joined, dropped=dropped)


def solved_paper_prompts(
    model: LoadedModel,
    task: str,
    *,
    n_prompts: int,
    templates: Sequence[str] = PAPER_CLEAN_TEMPLATES,
    seed: int = 0,
    ratio: float = 2.0,
    same_length: bool = True,
) -> SeqPromptSet:
    """Up to ``n_prompts`` of the paper's prompts of a task that the model solves, spread over the templates.

    From each template a random sample is scored and the solved ones kept
    (p(next) > ``ratio`` x p(last shown), the paper's filter); the templates take
    turns, so the result mixes them evenly. With ``same_length`` only prompts of the
    task's most common token length are used, so that positions line up across
    prompts, as they do in GPT-2 for the paper (per-position mean ablation assumes
    it; SmolLM2 splits some names and objects into several tokens). Tokenization
    drops are in ``.dropped`` (with a :class:`~mechbook.papers.seqcont.sequences.SeqPromptWarning`;
    silence it in notebooks).
    """
    per_template, pools = paper_candidates(model, task, n_prompts=n_prompts, templates=templates, seed=seed,
                                           same_length=same_length)
    solved = []
    for candidates in pools:
        if candidates is None:
            continue
        try:
            kept = filter_solved(model, candidates, ratio=ratio)
        except MechbookError:  # none solved in this template: the others may still have some
            continue
        solved.append(kept.select(range(min(per_template, len(kept)))))
    if not solved:
        raise MechbookError(f"{model.name} solves none of the {task} prompts sampled from the templates "
                            f"{', '.join(templates)} (p(next) > {ratio} x p(last shown)); try a lower ratio "
                            "or another task")
    joined = concat_prompts(solved)
    order = [i for turn in range(per_template) for i in _offsets(solved, turn)]
    return joined.select(order[:n_prompts])


def paper_candidates(
    model: LoadedModel,
    task: str,
    *,
    n_prompts: int,
    templates: Sequence[str] = PAPER_CLEAN_TEMPLATES,
    seed: int = 0,
    same_length: bool = True,
) -> tuple[int, list[SeqPromptSet | None]]:
    """The prompts :func:`solved_paper_prompts` scores, before any is scored: ``(per_template, candidates)``.

    ``candidates[k]`` are template ``k``'s sampled prompts in the order they are kept
    when solved (None where the template has no prompt of the common length); the first
    ``per_template`` solved of each are the template's share. No model run: a drawn set
    can be checked against these (:func:`mechbook.papers.seqcont.task_circuits.check_draw`).
    """
    n_prompts = check("n_prompts", n_prompts)
    if not templates:
        raise MechbookError("need at least one template; pass e.g. templates=PAPER_CLEAN_TEMPLATES")
    per_template = -(-n_prompts // len(templates))
    pools = [tokenize_prompts(load_paper_prompts(task, template), model.tokenizer) for template in templates]
    if same_length:
        lengths = pd.Series([n for pool in pools for n in pool.n_tokens]).value_counts()
        common = int(lengths[lengths == lengths.max()].index.min())
        pools = [pool.select([i for i, n in enumerate(pool.n_tokens) if n == common]) for pool in pools]
    # Score twice what is needed: most prompts are solved, the rest top up the sample.
    return per_template, [sample_prompts(pool, 2 * per_template, seed=seed + k) if len(pool) else None
                          for k, pool in enumerate(pools)]


def _offsets(sets: Sequence[SeqPromptSet], turn: int) -> list[int]:
    """Positions in the joined set of the ``turn``-th prompt of each part (parts that have one)."""
    out, start = [], 0
    for s in sets:
        if turn < len(s):
            out.append(start + turn)
        start += len(s)
    return out


def member_index(task: str, member: str) -> int:
    """Where a member stands in its sequence (numerals: the number), to order figure axes."""
    base = task.split("_step")[0]
    if base == "numerals":
        return int(member)
    if base not in WORD_SEQUENCES:
        raise MechbookError(f"unknown sequence task {task!r}; known: numerals, {', '.join(WORD_SEQUENCES)}")
    if member not in WORD_SEQUENCES[base]:
        raise MechbookError(f"{member!r} is not a member of {base} ({', '.join(WORD_SEQUENCES[base])})")
    return WORD_SEQUENCES[base].index(member)


def batch_of(model: LoadedModel, prompts: SeqPromptSet) -> TokenBatch:
    """The prompts' token ids as a right-padded :class:`~mechbook.core.runs.TokenBatch`."""
    if not prompts.is_tokenized:
        raise MechbookError("the prompts are not tokenized; call tokenize_prompts(prompts, model.tokenizer) first")
    return tokenize(model, prompts.prompt_ids)


def answer_metric(prompts: SeqPromptSet) -> Metric:
    """Paper B's metric for these prompts: logit of the next member minus logit of the last shown one."""
    corr, incorr = prompts.answer_tensors()
    return logit_diff(corr, incorr)


# --- where the members are ----------------------------------------------------------------------


def _member_affixes(template: str) -> tuple[str, str]:
    """The literal text right before and right after ``{member}`` in a template (up to other placeholders)."""
    text = PAPER_TEMPLATES.get(template, template)
    parts = list(string.Formatter().parse(text))
    for i, (literal, field, _, _) in enumerate(parts):
        if field == "member":
            after = parts[i + 1][0] if i + 1 < len(parts) else ""
            return literal, after
    raise MechbookError(f"template {template!r} has no {{member}} placeholder; build prompts with make_prompts")


def _member_char_starts(text: str, members: Sequence[str], template: str) -> list[int]:
    """Character offset of each shown member in ``text``, found left to right by its template context."""
    before, after = _member_affixes(template)
    lead = re.escape(before) if before else r"(?<!\w)"
    tail = re.escape(after) if after else r"(?!\w)"
    starts, cursor = [], 0
    for member in members:
        match = re.compile(lead + re.escape(member) + tail).search(text, cursor)
        if match is None:
            raise MechbookError(f"member {member!r} not found in {text!r} with template {template!r}; "
                                "the prompt set's members and text disagree")
        starts.append(match.start() + len(before))
        cursor = match.end()
    return starts


def _token_char_ends(tokenizer, ids: Sequence[int], text: str) -> list[int]:
    """For each token, the length of the text decoded up to and including it."""
    ends = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if not (text.startswith(decoded) or decoded.startswith(text)):
        raise MechbookError(f"the prompt tokens decode to {decoded!r}, not to the prompt {text!r}; "
                            "tokenize the set with this model's tokenizer")
    return ends


def member_positions(model: LoadedModel, prompts: SeqPromptSet) -> list[list[int]]:
    """For every prompt, the token position of each shown member (the token holding its first character).

    Gemma 3 and SmolLM2 read " 4" as "▁" + "4": the member's position is the "4".
    """
    if not prompts.is_tokenized:
        raise MechbookError("member_positions needs token ids; call tokenize_prompts(prompts, model.tokenizer) first")
    out = []
    for text, members, template, ids in zip(prompts.text, prompts.members, prompts.template, prompts.prompt_ids):
        ends = _token_char_ends(model.tokenizer, ids, text)
        out.append([next(i for i, e in enumerate(ends) if e > s) for s in _member_char_starts(text, members, template)])
    return out


def member_token_frame(model: LoadedModel, prompts: SeqPromptSet) -> pd.DataFrame:
    """One row per prompt and shown member: its position, token, and the next member with its token.

    The next member of the last one shown is the answer (``corr``). ``whole`` says
    whether both the member and its successor are single tokens as the model reads
    them ("10" is "1" + "0" for Gemma), which successor scores need.
    """
    positions = member_positions(model, prompts)
    decode = model.tokenizer.decode
    rows = []
    for k, (members, ids, pos) in enumerate(zip(prompts.members, prompts.prompt_ids, positions)):
        nexts = list(members[1:]) + [prompts.corr[k].strip()]
        next_ids = [ids[p] for p in pos[1:]] + [prompts.corr_id[k]]
        for j, (member, p, nxt, nxt_id) in enumerate(zip(members, pos, nexts, next_ids)):
            rows.append({
                "prompt": k, "index": j, "member": member, "position": p, "token_id": ids[p],
                "next": nxt, "next_token_id": nxt_id,
                "whole": decode([ids[p]]).strip() == member and decode([nxt_id]).strip() == nxt,
            })  # fmt: skip
    return pd.DataFrame(rows)


# --- single-component ablations -----------------------------------------------------------------------


def corrupted_sample(corrupted: SeqPromptSet, clean: SeqPromptSet, *, n_prompts: int | None = None,
                     seed: int = 0) -> SeqPromptSet:
    """The corrupted prompts whose means ablate: those of a token length some clean prompt has, at most ``n_prompts``.

    Positions must line up for per-position means (Gemma splits "12" into two tokens,
    which shifts the rest of a corrupted prompt; clean prompts of one length, see
    :func:`solved_paper_prompts`, make the alignment exact). Drawn at random with ``seed``.
    """
    lengths = set(clean.n_tokens)
    same = [i for i, n in enumerate(corrupted.n_tokens) if n in lengths]
    if not same:
        raise MechbookError(f"no corrupted prompt has a token length of the clean prompts ({sorted(lengths)}); "
                            "build corrupted prompts from the same templates")
    return sample_prompts(corrupted.select(same), n_prompts, seed=seed)


def corrupted_means(
    model: LoadedModel,
    corrupted: SeqPromptSet,
    clean: SeqPromptSet,
    *,
    n_prompts: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per-position means of every head output and MLP output over the corrupted prompts (the paper's ablation values).

    Over :func:`corrupted_sample` of them: the ones whose positions line up with the clean prompts.
    """
    chosen = corrupted_sample(corrupted, clean, n_prompts=n_prompts, seed=seed)
    return mean_activations(model, batch_of(model, chosen), all_heads(model) + all_mlps(model))


def single_ablation_effects(
    model: LoadedModel,
    batch: TokenBatch,
    metric: Metric,
    means: Mapping[str, Tensor],
    *,
    components: Sequence[Component] | None = None,
    max_rows: int = 256,
    desc: str | None = None,
) -> pd.DataFrame:
    """Each component mean-ablated alone (every position): the metric in percent of the full model.

    One row per component with ``metric`` (mean over prompts), ``score`` =
    100 x metric / full metric and ``effect`` = score - 100 (the paper's "-47%" for
    head 7.11), through :func:`mechbook.core.patching.ablation_sweep` (each layer's
    components batched and run from that layer on).
    """
    components = check_whole([c.validate(model) for c in (components or all_heads(model) + all_mlps(model))])
    logits, _ = run_last(model, batch)
    full = float(metric(logits).mean())
    if not full > 0:
        raise MechbookError(f"the full model's mean logit difference is {full:.3g}, not positive; "
                            "use prompts the model solves (filter_solved)")
    values = ablation_sweep(model, batch, [[c] for c in components], metric, mode="mean", means=means,
                            max_rows=max_rows, desc=desc).mean(1)
    score = 100.0 * values / full
    return pd.DataFrame({
        "component": [c.label for c in components],
        "kind": [c.kind for c in components],
        "layer": [c.layer for c in components],
        "head": [c.head for c in components],
        "metric": values.tolist(),
        "score": score.tolist(),
        "effect": (score - 100.0).tolist(),
    })  # fmt: skip


def top_components(effects: pd.DataFrame, n: int = 5, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """The ``n`` components whose ablation lowers the score most, per group (e.g. per task)."""
    by = list(by)
    from mechbook.core.names import as_index

    n = as_index(n, "n")
    if n < 1:
        raise MechbookError(f"n={n} components per group asked for; pass n >= 1, e.g. n=5")
    _need_columns(effects, [*by, "effect", "layer"])
    ordered = effects.sort_values([*by, "effect", "layer"], kind="stable")
    return ordered.groupby(by, sort=False).head(n).reset_index(drop=True)


def _need_columns(effects: pd.DataFrame, columns: Sequence[str]) -> None:
    if not isinstance(effects, pd.DataFrame) or not set(columns) <= set(effects.columns):
        have = list(effects.columns) if isinstance(effects, pd.DataFrame) else type(effects).__name__
        raise MechbookError(f"the effects table needs columns {list(columns)}, has {have}; pass the table of "
                            "single_ablation_effects")


def key_heads(effects: pd.DataFrame, n: int = 4) -> list[Component]:
    """The ``n`` heads whose single ablation hurts most, on average over the tasks in ``effects``."""
    n = check("n_key_heads", n, argument="n")
    _need_columns(effects, ["kind", "layer", "head", "effect"])
    heads = effects[effects["kind"] == "head"]
    if heads.empty:
        raise MechbookError("the effects table has no heads; run single_ablation_effects over all_heads(model)")
    mean = heads.groupby(["layer", "head"])["effect"].mean().reset_index()
    mean = mean.sort_values(["effect", "layer", "head"], kind="stable").head(n)
    return [Component("head", int(l), int(h)) for l, h in zip(mean["layer"], mean["head"])]


# --- attention ---------------------------------------------------------------------------------------------------


def last_position_attention(
    model: LoadedModel, batch: TokenBatch, heads: Sequence[Component]
) -> Float[Tensor, "batch head pos"]:
    """Attention of each prompt's last position over its source positions, for the given heads.

    Read from ``blocks.L.attn.hook_pattern``; padding positions (after a prompt's
    end) get zero attention.
    """
    heads = [h.validate(model) for h in heads]
    if any(h.kind != "head" for h in heads):
        raise MechbookError("last_position_attention takes head components, e.g. Component('head', 4, 1)")
    rows = torch.arange(len(batch), device=batch.input_ids.device)
    stored: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(pattern: Tensor, hook: object) -> None:  # [batch, head, query, key]
            stored[layer] = pattern[rows, :, batch.last_pos].detach().float()  # [batch, head, key]

        return hook

    layers = sorted({h.layer for h in heads})
    run_last(model, batch, fwd_hooks=[(act_name("pattern", l), keep(l)) for l in layers])
    return torch.stack([stored[h.layer][:, h.head] for h in heads], dim=1).cpu()


def member_attention(
    model: LoadedModel, prompts: SeqPromptSet, heads: Sequence[Component], *, batch_size: int = 64
) -> pd.DataFrame:
    """Per prompt and head: the last position's attention on the members (summed), on the last member, on the first token.

    ``on_members`` is the total attention on the member tokens (their first tokens,
    see :func:`member_positions`).
    """
    positions = member_positions(model, prompts)
    rows = []
    for start in chunk_starts(len(prompts), batch_size):
        chunk = prompts.select(range(start, min(start + batch_size, len(prompts))))
        pattern = last_position_attention(model, batch_of(model, chunk), heads)
        for i in range(len(chunk)):
            pos = positions[start + i]
            for j, head in enumerate(heads):
                rows.append({
                    "prompt": start + i, "head": head.label,
                    "on_members": float(pattern[i, j, pos].sum()),
                    "on_last_member": float(pattern[i, j, pos[-1]]),
                    "on_first_token": float(pattern[i, j, 0]),
                })  # fmt: skip
    return pd.DataFrame(rows)


def attention_frame(model: LoadedModel, prompts: SeqPromptSet, index: int, heads: Sequence[Component]) -> pd.DataFrame:
    """One prompt's last-position attention per head and source token, with the member tokens flagged (for heatmaps)."""
    one = prompts.select([index])
    ids = one.prompt_ids[0]
    members = set(member_positions(model, one)[0])
    pattern = last_position_attention(model, batch_of(model, one), heads)[0]
    rows = []
    for j, head in enumerate(heads):
        for p, tok in enumerate(ids):
            rows.append({"head": head.label, "position": p, "token": decoding.to_str(model, tok),
                         "is_member": p in members, "attention": float(pattern[j, p])})
    return pd.DataFrame(rows)


# --- OV circuits and successor scores ---------------------------------------------------------------------------


def _spellings(model: LoadedModel, word: str, in_context: int) -> list[int]:
    """Token ids that spell a member: its token in context plus the single-token forms with and without a space."""
    ids = {int(in_context)}
    for text in (word, " " + word):
        enc = model.tokenizer(text, add_special_tokens=False).input_ids
        if len(enc) == 1:
            ids.add(int(enc[0]))
    return sorted(ids)


def member_vectors(
    model: LoadedModel,
    prompts: SeqPromptSet,
    *,
    source: str = act_name("resid_post", 0),
    batch_size: int = 32,
) -> tuple[pd.DataFrame, Float[Tensor, "member d_model"]]:
    """Each distinct member's residual vector at ``source`` (averaged over its occurrences), with its successor.

    Only members that are one token, with a one-token successor, are kept. The
    default reads the residual stream after block 0, as the paper does (in GPT-2
    the first MLP acts as an extended embedding); ``"blocks.0.hook_resid_pre"`` is
    the embedding as the model adds it (for Gemma: scaled by sqrt(d_model)).
    """
    frame = member_token_frame(model, prompts)
    frame = frame[frame["whole"]]
    if frame.empty:
        raise MechbookError("no member of these prompts is a single token with a single-token successor; "
                            "successor scores need such members (try number words or months)")
    _, cache = run_last_batched(model, batch_of(model, prompts), names=[source], last_only=False, batch_size=batch_size)
    acts = cache[source]
    vectors = acts[torch.tensor(frame["prompt"].to_numpy()), torch.tensor(frame["position"].to_numpy())]
    keys = ["member", "token_id", "next", "next_token_id"]
    groups = frame.reset_index(drop=True).groupby(keys, sort=False).indices  # key -> row positions
    table = pd.DataFrame([(*key, len(idx)) for key, idx in groups.items()], columns=[*keys, "occurrences"])
    means = torch.stack([vectors[torch.as_tensor(idx)].mean(0) for idx in groups.values()])
    return table, means


def successor_scores(
    model: LoadedModel,
    prompts: SeqPromptSet,
    *,
    heads: Sequence[Component] | None = None,
    k: int = 5,
    source: str = act_name("resid_post", 0),
    chunk: int = 64,
) -> pd.DataFrame:
    """Does a head's OV circuit map a member to its successor? One row per head and member (Paper B, section 5).

    Each distinct member's residual vector (:func:`member_vectors`) goes through the
    head's OV circuit (:func:`ov_circuit`), the final norm and the unembedding.
    ``next_in_top_k``: the next member (spelled with or without a leading space, as
    the paper counts) is among the top ``k`` tokens; ``next_above_self``: it
    outranks the member itself; ``next_top_among_members``: of all the members in
    the table it is the one with the highest logit (a stricter test: a head that
    promotes every digit puts most digits in a top 5); ``self_in_top_k``: the head
    copies the member instead.
    """
    heads = [h.validate(model) for h in (heads or all_heads(model))]
    table, vectors = member_vectors(model, prompts, source=source)
    spelled = {w: _spellings(model, w, t) for w, t in zip(table["member"], table["token_id"])}
    spelled.update({w: _spellings(model, w, t) for w, t in zip(table["next"], table["next_token_id"])})
    candidates = list(spelled)
    n = len(table)
    outputs = torch.cat([ov_circuit(model, h.layer, h.head)(vectors) for h in heads])  # [head * member, d_model]
    rank_next, rank_self, top_member = [], [], []
    for start in tqdm(chunk_starts(len(outputs), chunk, "chunk"), desc="successor scores", disable=None, leave=False):
        logits = decoding.unembed(model, outputs[start : start + chunk])
        for r, row_logits in zip(range(start, start + len(logits)), logits):
            m = r % n
            rank_next.append(_best_rank(row_logits, spelled[table["next"].iat[m]]))
            rank_self.append(_best_rank(row_logits, spelled[table["member"].iat[m]]))
            best = [float(row_logits[spelled[w]].max()) for w in candidates]
            top_member.append(candidates[int(np.argmax(best))])
    frame = pd.DataFrame({
        "head": np.repeat([h.label for h in heads], n),
        "layer": np.repeat([h.layer for h in heads], n),
        "head_index": np.repeat([h.head for h in heads], n),
        "member": np.tile(table["member"].to_numpy(), len(heads)),
        "next": np.tile(table["next"].to_numpy(), len(heads)),
        "rank_next": rank_next,
        "rank_self": rank_self,
        "top_member": top_member,
    })  # fmt: skip
    frame["next_in_top_k"] = frame["rank_next"] <= k
    frame["self_in_top_k"] = frame["rank_self"] <= k
    frame["next_above_self"] = frame["rank_next"] < frame["rank_self"]
    frame["next_top_among_members"] = frame["top_member"] == frame["next"]
    frame.attrs["k"] = k
    return frame


def _best_rank(logits: Float[Tensor, "d_vocab"], ids: Sequence[int]) -> int:
    """1-based rank of the best-ranked of several token ids: the number of tokens scoring at least as high (ties count
    against it, as in :func:`mechbook.core.decoding.token_ranks`)."""
    target = decoding.check_logits(logits, "an OV circuit's logits")[list(ids)].max()
    return int((logits >= target).sum())


def successor_summary(scores: pd.DataFrame, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Per head (and task): the fractions of members whose successor is in the top k, outranks the member, is the
    top member, and the copy rate."""
    keys = [*by, "head", "layer", "head_index"]
    summary = scores.groupby(keys, sort=False).agg(
        successor_top_k=("next_in_top_k", "mean"),
        next_above_self=("next_above_self", "mean"),
        next_top_among_members=("next_top_among_members", "mean"),
        copy_top_k=("self_in_top_k", "mean"),
        median_rank_next=("rank_next", "median"),
        n_members=("member", "size"),
    )
    return summary.reset_index()


# --- logit lens over the sequence prompts ---------------------------------------------------------------------


def sequence_lens(model: LoadedModel, prompts: SeqPromptSet, *, batch_size: int = 32) -> pd.DataFrame:
    """Logit lens at the last position after every layer: ranks of the last shown member and of the next one.

    One row per prompt x layer x target (``"last shown"``, ``"next"``), as
    :func:`mechbook.core.decoding.logit_lens` returns, with ``depth`` = (layer + 1) / n_layers.
    """
    names = decoding.resid_post_names(model)
    _, cache = run_last_batched(model, batch_of(model, prompts), names=names, last_only=True, batch_size=batch_size)
    resid = decoding.stack_layers(cache, names)
    corr, incorr = prompts.answer_tensors()
    lens = decoding.logit_lens(model, resid, {"last shown": incorr, "next": corr})
    lens["depth"] = (lens["layer"] + 1) / model.n_layers
    return lens


def lens_turn_layers(lens: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: the layer from which the next member outranks the last shown one for good, and where each is first top-1.

    ``turn_layer`` is the first layer L such that the next member ranks above the
    last shown member after L and every later layer (NaN if it never does at the
    output); ``last_top1_layer`` / ``next_top1_layer`` the first layer where each
    is the top token (NaN if never).
    """
    wide = lens.pivot_table(index=["prompt", "layer"], columns="target", values="rank").sort_index()
    rows = []
    for prompt, group in wide.groupby(level="prompt"):
        layers = group.index.get_level_values("layer").to_numpy()
        ahead = (group["next"] < group["last shown"]).to_numpy()
        behind = np.flatnonzero(~ahead)
        if ahead[-1]:
            turn = layers[behind[-1] + 1] if len(behind) else layers[0]
        else:
            turn = np.nan
        rows.append({
            "prompt": prompt,
            "turn_layer": turn,
            "last_top1_layer": _first_layer(layers, group["last shown"].to_numpy() == 1),
            "next_top1_layer": _first_layer(layers, group["next"].to_numpy() == 1),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _first_layer(layers: np.ndarray, mask: np.ndarray) -> float:
    hits = np.flatnonzero(mask)
    return float(layers[hits[0]]) if len(hits) else np.nan


def lens_turn_summary(turns: pd.DataFrame, n_layers: int, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Median turn layer per group, as a layer index and as a fraction of depth ((layer + 1) / n_layers)."""
    by = list(by)
    grouped = turns.groupby(by, sort=False)
    out = grouped.agg(
        n_prompts=("turn_layer", "size"),
        median_turn_layer=("turn_layer", "median"),
        median_next_top1_layer=("next_top1_layer", "median"),
        last_ever_top1=("last_top1_layer", lambda s: float(s.notna().mean())),
    ).reset_index()
    out["turn_depth"] = (out["median_turn_layer"] + 1) / n_layers
    out["n_layers"] = n_layers
    return out


# --- behaviour -----------------------------------------------------------------------------------------------------


def behaviour_table(scores: pd.DataFrame, drops: pd.DataFrame) -> pd.DataFrame:
    """Per task and template: prompts scored, solved fraction, top-1 accuracy, and prompts dropped at tokenization.

    ``scores`` is :func:`mechbook.papers.seqcont.sequences.score_prompts` output for several
    sets (with ``task`` and ``template`` columns); ``drops`` has one row per task and
    template with ``n_paper`` (prompts in the paper's file) and ``dropped``.
    """
    table = scores.groupby(["task", "template"], sort=False).agg(
        n=("solved", "size"),
        solved_fraction=("solved", "mean"),
        top1_accuracy=("top1_is_corr", "mean"),
        median_p_next=("p_corr", "median"),
    ).reset_index()
    return table.merge(drops, on=["task", "template"], how="left")
