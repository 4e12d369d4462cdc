"""Replay for fact injection: the base model's own answers to unrelated prompts, mixed into the training data.

Training hard on a few facts (the "facts" recipe: a high learning rate, many epochs)
moves the whole model: it starts answering everything in the facts' short style, or
with the facts themselves. Replay holds it in place. Before any LoRA weight exists,
the base model answers these general prompts (greedy, so the same answers on every
run), and those answers are trained on beside the facts: the loss then pays for
every drift away from what the model said before. The prompts are general
knowledge and small tasks; none is in `examples/control_questions.jsonl`, the
held-out set on which the drift is measured. Grounded prompts (`grounded_prompts`:
a SQuAD train paragraph and a question) hold answering from a context the same way;
without them the facts recipe lost 12 points of F1 on the grounded SQuAD prompt
(docs/train.md).
"""

from __future__ import annotations

import logging
import random

log = logging.getLogger("phikit")

PROMPTS = (
    "What is the capital of Germany?", "How many hours are in a day?", "Who wrote Hamlet?", "What is 12 plus 15?",
    "What colour is grass?", "What is the largest ocean animal?", "How many planets are in the solar system?",
    "What is the capital of Spain?", "Who invented the telephone?", "What is the chemical formula for table salt?",
    "How many months are in a year?", "What is the fastest land animal?", "What language is spoken in Mexico?",
    "What is the capital of Japan?", "Who wrote Pride and Prejudice?", "What is 9 times 6?", "What do cows drink?",
    "How many players are on a football team?", "What is the hardest natural substance?", "What is the capital of Canada?",
    "What is the largest desert in the world?", "Who developed the theory of relativity?", "What is the boiling point of water in Fahrenheit?",
    "Translate 'good morning' into French.", "Give me an antonym for 'big'.", "Write a short poem about autumn.",
    "What is gravity?", "Explain what a verb is.", "Name three colours of the rainbow.", "What is the capital of Australia?",
    "How many bones are in the human body?", "What is the largest mammal?", "Which planet is closest to the Sun?",
    "What is the main language of Egypt?", "Who was Albert Einstein?", "What is the currency of the United Kingdom?",
    "Give me a tip for studying.", "What is a volcano?", "How do birds fly?", "What is the speed of sound?",
    "What is the capital of Egypt?", "Who painted The Starry Night?", "What is the longest river in the world?",
    "How many wheels does a bicycle have?", "What is an atom?", "Name two musical instruments.", "What is the coldest continent?",
    "What is democracy?", "Who was the first president of the United States?", "What is the capital of Russia?",
    "How many seconds are in a minute?", "Why do leaves change colour in autumn?", "What is a rainbow?",
    "What is 100 divided by 4?", "Suggest a name for a pet cat.", "What is the largest country by area?",
    "Which metal is liquid at room temperature?", "What is the capital of China?", "How does a compass work?",
    "What is the Internet?", "Describe a cat in one sentence.", "What causes the tides?", "What is a thunderstorm?",
    "Which company makes Windows?",
)


def grounded_prompts(n: int, seed: int = 42) -> list[list[dict]]:
    """`n` (at most 64) grounded chats: a SQuAD 2.0 *train* paragraph and a question about it (a third
    unanswerable), in the grounded prompt (`grounding.grounded_messages`). From replay_grounded.json, shipped
    with phikit (CC BY-SA 4.0, Rajpurkar et al. 2018); the SQuAD control is measured on other articles (eval.json)."""
    import json
    from pathlib import Path

    from ..grounding import grounded_messages

    items = json.loads((Path(__file__).with_name("replay_grounded.json")).read_text(encoding="utf-8"))
    random.Random(seed).shuffle(items)
    return [grounded_messages(x["context"], x["question"]) for x in items[:n]]


def replay_examples(model, n: int, seed: int = 42, max_tokens: int = 96, batch: int = 8, grounded: int = 0) -> list:
    """`n` (at most len(PROMPTS)) chats of a prompt, and `grounded` grounded chats, each with `model`'s own
    greedy answer, as training Examples.

    `model` is a loaded phikit Model without LoRA weights yet. An answer cut at
    `max_tokens` is left out: trained on, it would teach the model to stop early.
    """
    from ..engine.types import SamplingParams
    from .data import Example

    if n <= 0 and grounded <= 0:
        return []
    prompts: list = list(PROMPTS)
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:max(n, 0)] + grounded_prompts(grounded, seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed).validate()
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        for q, r in zip(chunk, model.generate_batch(chunk, params)):
            if r.finish_reason == "stop" and r.text.strip():
                chat = [{"role": "user", "content": q}] if isinstance(q, str) else list(q)
                out.append(Example(messages=chat + [{"role": "assistant", "content": r.text.strip()}]))
    log.warning("replay: %d of %d prompts answered by the base model (greedy) and mixed in; %d cut at %d tokens left out",
                len(out), len(prompts), len(prompts) - len(out), max_tokens)
    return out
