"""What differs between the two kinds of task (`data.task`) and the three shapes of row (`data.format`).

classification: each answer is a label from a small set. The split is stratified by label, labels are
checked (label set, case, "can never be predicted", rows per label) and a generation is read as a label.
generation: each answer is free text (unique, multi-line, punctuation, JSON). The split is one seeded
shuffle, no label check applies, and generations are scored as text (ortune.textmetrics).

Rows as people have them:
- text: `data.template` renders the prompt and the completion. With `data.template.prompt_no_input`, the
  fields `prompt` names and that template does not are optional: a row where one of them is empty or
  missing renders with `prompt_no_input` (the Alpaca template's two variants);
- chat: one user turn (`data.input_column`) and one assistant turn (`data.output_column`);
- messages: a list of {role, content} turns (`data.messages_field`), as most Hub chat sets hold it. Each
  assistant turn becomes one conversational prompt/completion example: the turns before it are the prompt,
  it is the completion. TRL's completion-only loss then scores exactly that turn's tokens (and its end of
  turn), so every assistant turn is learned once and nothing the user said is. TRL's own conversational
  format (`messages` + assistant_only_loss) needs `{% generation %}` markers in the chat template, which
  SmolLM2's ChatML template and most others lack (TRL patches only the templates it lists); the expansion
  works with any chat template, and the eval, parity and apps see the same prompt shape as single-turn chat.
"""

from __future__ import annotations

from collections.abc import Callable

from ortune.errors import OrtuneError

CLASSIFICATION, GENERATION = "classification", "generation"
ROLES = ("system", "user", "assistant")
# eval.max_new_tokens=null for generation: the longest training answer plus this share of it (at least
# MIN_MARGIN tokens), so an answer longer than any seen is still not cut; for classification a label and
# its end token fit in CLASSIFICATION_NEW_TOKENS (today's default, unchanged).
MARGIN, MIN_MARGIN, CLASSIFICATION_NEW_TOKENS = 0.25, 8, 6


def is_generation(spec) -> bool:
    """spec: the `data` settings, or an ortune.json task spec (which has no `task` key before free text)."""
    return (spec.get("task") if hasattr(spec, "get") else spec.task) == GENERATION


def optional_fields(spec) -> list[str]:
    """The prompt's fields a row may leave empty or out (those `prompt_no_input` does not name)."""
    from ortune.data import template_fields

    if spec.format != "text" or spec.template.get("prompt_no_input") is None:
        return []
    full = template_fields(spec.template.prompt)
    kept = template_fields(spec.template.prompt_no_input)
    if extra := [name for name in kept if name not in full]:
        raise OrtuneError(
            f"data.template.prompt_no_input names {', '.join(extra)}, which data.template.prompt does not; "
            "it must be the prompt without its optional fields"
        )
    optional = [name for name in dict.fromkeys(full) if name not in kept]
    if not optional:
        raise OrtuneError(
            "data.template.prompt_no_input names every field of data.template.prompt, so no field is optional; "
            "drop the optional fields from it (e.g. {input}) or set it to null"
        )
    return optional


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# ---- checking --------------------------------------------------------------------------------------


def check_rows(rows: list[dict], spec, source: str) -> None:
    """Every field the configured format needs, present and usable in every row (one line naming the first
    bad row otherwise); the label field too for classification."""
    from ortune import data
    from ortune.records import place

    if spec.format == "messages":
        for index, row in enumerate(rows):
            where = place(rows, index, source)
            if spec.messages_field not in row:
                raise OrtuneError(
                    f"{where} has no field '{spec.messages_field}' named by data.messages_field (its fields: "
                    f"{', '.join(map(str, sorted(row)))}); fix data.messages_field or the file"
                )
            check_conversation(row[spec.messages_field], where, spec.messages_field)
        return
    input_fields, output_fields, setting = data.input_output_fields(spec)
    optional = optional_fields(spec)
    data.check_fields(rows, [f for f in input_fields if f not in optional] + output_fields, source, setting)
    for name in optional:  # may be empty or missing; where given, it must be text
        for index, row in enumerate(rows):
            if isinstance(row.get(name), (dict, list)):
                raise OrtuneError(
                    f"{place(rows, index, source)}: '{name}' is a {type(row[name]).__name__}, not text; "
                    "flatten the file so that each field holds one value"
                )
    if not is_generation(spec):
        data.check_fields(rows, [spec.label_field], source, "data.label_field")


def check_conversation(turns, where: str, field: str) -> None:
    if not isinstance(turns, list) or not turns:
        raise OrtuneError(
            f"{where}: '{field}' must be a non-empty list of turns like "
            '{"role": "user", "content": "..."}; found ' + (type(turns).__name__ if turns else "nothing")
        )
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise OrtuneError(
                f"{where}: turn {number} of '{field}' is {str(turn)[:80]!r}; each turn needs a role "
                f"({', '.join(ROLES)}) and a text content"
            )
    if not any(turn["role"] == "assistant" and turn["content"].strip() for turn in turns):
        raise OrtuneError(f"{where}: '{field}' has no non-empty assistant turn, so nothing to learn; remove the row")
    if turns[0]["role"] == "assistant" or all(t["role"] != "user" for t in turns):
        raise OrtuneError(f"{where}: '{field}' must have a user turn before the first assistant turn")


# ---- rendering -------------------------------------------------------------------------------------


def renderer(spec) -> Callable[[dict], list[dict]]:
    """row -> the prepared rows it makes: one, or one per assistant turn of a conversation. The settings are
    read once here, not per row (an OmegaConf lookup costs ~30 us: 13 per row were most of prepare_data's time)."""
    generation, label_field = is_generation(spec), spec.label_field
    if spec.format == "messages":
        field = spec.messages_field

        def conversation(row: dict) -> list[dict]:
            turns = [{"role": t["role"], "content": t["content"]} for t in row[field]]
            return [
                {"prompt": turns[:i], "completion": [turn]}
                for i, turn in enumerate(turns)
                if turn["role"] == "assistant"
                and turn["content"].strip()
                and any(t["role"] == "user" for t in turns[:i])
            ]

        return conversation
    if spec.format == "chat":
        asked, answered = spec.input_column, spec.output_column

        def pair(row: dict) -> dict:
            return {
                "prompt": [{"role": "user", "content": str(row[asked])}],
                "completion": [{"role": "assistant", "content": str(row[answered])}],
            }

    else:
        prompt, no_input, completion = (
            spec.template.prompt,
            spec.template.get("prompt_no_input"),
            spec.template.completion,
        )
        optional = optional_fields(spec)

        def pair(row: dict) -> dict:
            chosen = no_input if any(_blank(row.get(name)) for name in optional) else prompt
            values = {key: ("" if value is None else value) for key, value in row.items()}
            return {"prompt": chosen.format(**values), "completion": completion.format(**values)}

    def one(row: dict) -> list[dict]:
        rendered = pair(row)
        if not generation:
            rendered["label"] = str(row[label_field])
        return [rendered]

    return one


def render_rows(row: dict, spec) -> list[dict]:
    """The prepared rows one source row makes (see renderer; for many rows, call renderer once)."""
    return renderer(spec)(row)


def render_row(row: dict, spec) -> dict:
    """One prepared row of a text or chat row: prompt, completion and, for classification, the label."""
    if spec.format == "messages":
        raise OrtuneError("data.format=messages: a conversation makes one row per assistant turn (render_rows)")
    return renderer(spec)(row)[0]


def render_split(rows: list[dict], spec) -> tuple[list[dict], list[dict]]:
    """(each prepared row's source row, the prepared rows), aligned: a conversation's row repeats."""
    sources, rendered, render = [], [], renderer(spec)
    for row in rows:
        for made in render(row):
            sources.append(row)
            rendered.append(made)
    return sources, rendered


def answer(row: dict) -> str:
    """A prepared row's answer as text (a chat completion's assistant content)."""
    completion = row["completion"]
    return completion if isinstance(completion, str) else completion[0]["content"]


def row_input_text(prompt) -> str:
    """A free-text row's question as a person would ask it: a chat prompt's last user turn, else the prompt."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
