"""Alpaca records to prompt/completion pairs.

The loss is on the completion only (TRL's prompt-completion format), the completion ends with EOS
(TRL appends it), and nothing is added to the vocabulary.
"""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def to_example(record: dict, template: str = "alpaca", tokenizer=None) -> dict:
    """One training example in TRL's prompt-completion layout.

    ``template="chat"`` uses the tokenizer's chat template (conversational prompt/completion), which
    TRL renders itself; ``"alpaca"`` uses the Stanford Alpaca template as plain text.
    """
    instruction, inp, output = record["instruction"], record.get("input", ""), record["output"]
    if template == "alpaca":
        return {"prompt": alpaca_prompt(instruction, inp), "completion": output}
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.template='chat' needs a tokenizer with a chat template")
        user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
        return {"prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": output}]}
    raise ValueError(f"unknown template {template!r}; use 'alpaca' or 'chat'")


def render_prompt(record: dict, template: str = "alpaca", tokenizer=None) -> str:
    """The text prompt to send to a served model for ``record`` (generation or scoring)."""
    ex = to_example(record, template, tokenizer)
    if template == "alpaca":
        return ex["prompt"]
    return tokenizer.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
