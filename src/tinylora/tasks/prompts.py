"""How a question becomes a prompt: the chat template, the default system prompt, and the answer-line instruction
that the tasks scored by the "####" rule append (each task names its own: `tinylora.tasks.instruction`)."""

from __future__ import annotations

DEFAULT_SYSTEM = "You are a helpful assistant."
# Measured on the default model (64 level-1/2 problems, 48 new tokens, 4 samples each at T=0.7): with this
# suffix 43% of samples show a one-line calculation first (81% of those correct), 29% answer at once
# (15% correct) and 28% ramble past the limit; greedy accuracy is 45%. That mix is what GRPO needs: a
# good behaviour the model already produces sometimes. "Solve it in one or two short lines, then ..."
# gave 78% direct answers and 2% calculations, "think step by step" never finished in time.
DEFAULT_SUFFIX = ("\nShow the calculation in one short line, then give the final answer on the last line as "
                  "\"#### <number>\".")


def chat_prompts(tokenizer, questions: list[str], suffix: str | None = None,
                 system: str | None = DEFAULT_SYSTEM) -> list[str]:
    """Questions, each followed by `suffix` (a task's answer-format instruction), wrapped in the model's chat
    template (plain text when it has none)."""
    suffix, out = suffix or "", []
    for q in questions:
        if tokenizer.chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                    "content": q + suffix}]
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            out.append(f"Question: {q}{suffix}\nAnswer:")
    return out
