"""What the untuned base model does without fine-tuning, measured as a reviewer would: the floor the
fine-tuned model's gain is stated against.

Three ways to ask it, all through its own chat template with eval.baseline_prompt (the label set and the
row's text), the strongest of which (majority class included) is the fair baseline:
- `prompted`: it answers in free text, eval.baseline_new_tokens tokens (room for a sentence, "The tone
  of the text is fear."), read by a lenient parse (ortune.metrics.lenient_label: the single label the
  answer names). A generation task scores this answer with its own metrics.
- log-likelihood multiple choice, zero-shot and eval.baseline_shots-shot (`loglik_zero_shot`,
  `loglik_k_shot`): the label whose tokens, as the assistant's answer, have the highest summed
  log-probability given the prompt; lm-evaluation-harness's `multiple_choice` output type (its `acc`,
  `_encode_pair`: the continuation's tokens are those the whole string adds to the prompt's). Nothing to
  parse, so no answer format can hide what the model knows. One forward of each prompt; the labels'
  later tokens, if any, continue its cached keys and values.
- majority class: always the most frequent training label (ortune.metrics.majority_label).
"""

from __future__ import annotations

import functools
import logging
import re
import string

from omegaconf import DictConfig

from ortune.errors import OrtuneError

log = logging.getLogger("ortune")


# ---- the questions --------------------------------------------------------------------------------


def prompted_prompts(
    cfg: DictConfig, rows: list[dict], labels: list[str], train: list[dict], shots: int | None = None
) -> tuple[list[str], str]:
    """(each row as the untuned base is asked it, and how: "chat" through its chat template, or "text"
    when its tokenizer has none). The question is eval.baseline_prompt with {labels} and {input} (the
    row's own text, recovered from its rendered prompt); `shots` (default eval.baseline_shots) answered
    training rows go first, as earlier turns of the conversation."""
    from ortune import modeling

    e, spec = cfg.eval, cfg.data
    chosen = pick_shots(train, e.baseline_shots if shots is None else shots)
    listed = ", ".join(labels)
    ask = [e.baseline_prompt.format(labels=listed, input=row_input(r["prompt"], spec)) for r in chosen]
    turns = [
        turn
        for question, row in zip(ask, chosen)
        for turn in ({"role": "user", "content": question}, {"role": "assistant", "content": row["label"]})
    ]
    questions = [e.baseline_prompt.format(labels=listed, input=row_input(r["prompt"], spec)) for r in rows]
    tokenizer = modeling.load_tokenizer(cfg.paths.base_model, cfg.model.trust_remote_code)
    if tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template(
                [*turns, {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ], "chat"
    # A base model without a chat template is a plain LM: the same question and shots as a text to continue.
    log.warning(
        "%s: the tokenizer has no chat template; the prompted baseline asks in plain text "
        "('<question>\\nAnswer:') instead",
        cfg.paths.base_model,
    )
    examples = "".join(f"{question}\nAnswer: {row['label']}\n\n" for question, row in zip(ask, chosen))
    return [f"{examples}{q}\nAnswer:" for q in questions], "text"


def pick_shots(train: list[dict], k: int) -> list[dict]:
    """k training rows, the labels taking turns (sorted), each label's rows in split order: every label
    is shown once before any is shown twice."""
    if k > len(train):
        raise OrtuneError(f"eval.baseline_shots={k}: the training split has only {len(train)} rows; lower it")
    by_label: dict[str, list[dict]] = {}
    for row in train:
        by_label.setdefault(row["label"], []).append(row)
    queues = [by_label[label] for label in sorted(by_label)]
    turns = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    return turns[:k]


def row_input(prompt: str | list[dict], spec: DictConfig) -> str:
    """The text a prepared prompt was rendered from: a chat prompt's (last) user turn, or the fields of
    data.template.prompt read back out of a text prompt (joined by newlines when there are several)."""
    if not isinstance(prompt, str):
        return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    groups, pattern = _template_pattern(spec.template.prompt)
    if not groups:
        raise OrtuneError(
            "data.template.prompt has no {field}, so a prompt holds no text to ask the prompted "
            "baseline about; drop 'prompted' from eval.compare"
        )
    match = pattern.fullmatch(prompt)
    if match is None:
        raise OrtuneError(
            f"data.template.prompt does not produce the prompt {prompt[:60]!r}; the prepared split "
            "is older than the template: rerun prepare_data (dvc repro), or drop 'prompted' from eval.compare"
        )
    return "\n".join(match.group(group) for group in groups)


@functools.lru_cache(maxsize=8)
def _template_pattern(template: str) -> tuple[list[str], re.Pattern]:
    """A regex that matches exactly what `template` renders, one group per field (a repeated field must repeat)."""
    names: list[str] = []
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field in names:
            parts.append(f"(?P=f{names.index(field)})")
        else:
            parts.append(f"(?P<f{len(names)}>.*?)")
            names.append(field)
    return [f"f{i}" for i in range(len(names))], re.compile("".join(parts), re.DOTALL)


def choice_prompts(cfg: DictConfig, rows: list[dict], labels: list[str], train: list[dict]) -> dict:
    """The log-likelihood baselines' prompts, by name: zero-shot, and eval.baseline_shots-shot when it is
    above 0. In plain text (no chat template) a label follows "Answer:" after a space, as
    lm-evaluation-harness's target_delimiter; after a chat template's assistant turn it follows at once."""
    asked = {"loglik_zero_shot": prompted_prompts(cfg, rows, labels, train, shots=0)}
    if cfg.eval.baseline_shots:
        asked["loglik_k_shot"] = prompted_prompts(cfg, rows, labels, train)
    shots = {"loglik_zero_shot": 0, "loglik_k_shot": cfg.eval.baseline_shots}
    return {
        name: {"prompts": prompts, "delimiter": "" if how == "chat" else " ", "format": how, "shots": shots[name]}
        for name, (prompts, how) in asked.items()
    }


# ---- log-likelihood scoring -------------------------------------------------------------------------


def continuation_ids(tokenizer, prompt: str, continuation: str) -> list[int]:
    """The tokens `continuation` adds after `prompt` (lm-evaluation-harness's _encode_pair): the whole
    string's tokens past the prompt's, where the prompt's tokens are a prefix of them; else the
    continuation tokenized alone (a tokenizer that merges across the boundary)."""
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    whole = tokenizer(prompt + continuation, add_special_tokens=True)["input_ids"]
    if whole[: len(head)] == head and len(whole) > len(head):
        return list(whole[len(head) :])
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def label_log_likelihoods(
    model, tokenizer, prompts: list[str], labels: list[str], delimiter: str = "", batch_size: int = 16
) -> list[list[float]]:
    """For each prompt, the summed log-probability of each label's tokens as its continuation.

    The tokens every prompt starts with (the system turn, the shots, the instruction: most of a k-shot
    prompt) run forward once; each batch of prompts then runs only its own tokens on a copy of that cache
    (left-padded after the shared part, positions counted over real tokens only). A label's first token is
    read from the last position's distribution; its later tokens, if it has any, run on the batch's cache,
    cropped back afterwards. A row whose label tokens differ from the batch's (a boundary merge) is scored
    on its own. SmolLM2-135M, 144 test rows, 2 cores (AMD EPYC), one run: the 4-shot prompts (276 tokens)
    took 138 s without the shared part, 18 s with it; zero-shot (68 tokens) 31 s and 12 s; same scores."""
    import copy

    import torch

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    shared = _shared_prefix(encoded)
    prefix_cache = None
    if shared:
        with torch.inference_mode():
            prefix_cache = model(input_ids=torch.tensor([encoded[0][:shared]]), use_cache=True).past_key_values
    scores: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [[continuation_ids(tokenizer, p, delimiter + label) for label in labels] for p in chunk]
        own = [row[shared:] for row in encoded[start : start + batch_size]]
        width = max(map(len, own))
        feed = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in own])
        own_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in own])
        mask = torch.cat([torch.ones(len(chunk), shared, dtype=own_mask.dtype), own_mask], dim=1)
        positions = (shared + own_mask.cumsum(-1) - 1).clamp(min=shared)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
        with torch.inference_mode():
            out = model(
                input_ids=feed, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        cache = out.past_key_values
        chunk_scores = [[float(first[r, ids[r][j][0]]) for j in range(len(labels))] for r in range(len(chunk))]
        for j in range(len(labels)):
            tails = {tuple(ids[r][j]) for r in range(len(chunk))}
            if all(len(t) == 1 for t in tails):
                continue
            if len(tails) == 1:  # the usual case: one label, the same tokens on every row
                (tail,) = tails
                rest = _continue(model, cache, mask, positions, list(tail))
                for r in range(len(chunk)):
                    chunk_scores[r][j] += float(rest[r])
            else:
                for r in range(len(chunk)):
                    chunk_scores[r][j] = _alone(model, tokenizer, chunk[r], ids[r][j])
        scores += chunk_scores
    return scores


def _shared_prefix(encoded: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own (whose
    distribution gives the first label token)."""
    shared = min(map(len, encoded)) - 1
    for row in encoded[1:]:
        shared = next((i for i in range(shared) if row[i] != encoded[0][i]), shared)
    return max(shared, 0)


def _continue(model, cache, mask, positions, tail: list[int]):
    """log p(tail[1:] | prompt, tail[0], ...) per row, on the prompt's cache (cropped back afterwards)."""
    import torch

    rows, extra = mask.shape[0], len(tail) - 1
    feed = torch.tensor([tail[:-1]] * rows)
    with torch.inference_mode():
        out = model(
            input_ids=feed,
            attention_mask=torch.cat([mask, torch.ones(rows, extra, dtype=mask.dtype)], dim=1),
            position_ids=positions[:, -1:] + 1 + torch.arange(extra),
            past_key_values=cache,
            use_cache=True,
        )
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    targets = torch.tensor(tail[1:])
    total = logp[:, torch.arange(extra), targets].sum(dim=1)
    cache.crop(-extra)  # a negative count removes that many positions, in transformers 4 and 5 alike
    return total


def _alone(model, tokenizer, prompt: str, tail: list[int]) -> float:
    """The summed log-probability of `tail` after `prompt`, one unpadded forward of the whole sequence."""
    import torch

    head = tokenizer(prompt, return_tensors="pt")["input_ids"]
    sequence = torch.cat([head, torch.tensor([tail])], dim=1)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=sequence).logits[0].float(), dim=-1)
    n = head.shape[1]
    return float(sum(logp[n - 1 + i, token] for i, token in enumerate(tail)))


def best_labels(scores: list[list[float]], labels: list[str]) -> list[str]:
    """Each row's highest-scoring label (the first listed on a tie, as numpy's argmax)."""
    return [labels[max(range(len(labels)), key=lambda j, row=row: (row[j], -j))] for row in scores]
