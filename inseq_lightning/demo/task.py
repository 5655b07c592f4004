"""A small task the project generates: answer a question from a short context with distractors.

Each example lists three facts ("Mia keeps a red kite.") and asks about one person; the answer is
the object of that person's fact. The fact that answers the question is the probe's evidence:
a model that learned the task should put its attribution there, not on the distractors.
"""

import random
from dataclasses import dataclass

from ..monitor.probes import Probe, ProbeSet

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Liam", "Ivy", "Omar", "Lena", "Hugo", "Nora", "Theo", "Ruth", "Max"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
OBJECTS = ["kite", "boat", "lamp", "book", "chair", "clock", "drum", "hat", "vase", "bike", "cup", "key"]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # with its leading space: the continuation after the prompt
    evidence: str  # the fact sentence that answers the question


def make_example(rng: random.Random, n_facts: int = 3) -> Example:
    names = rng.sample(NAMES, n_facts)
    facts = [(name, rng.choice(COLOURS), rng.choice(OBJECTS)) for name in names]
    asked = rng.randrange(n_facts)
    sentences = [f"{name} keeps a {colour} {obj}." for name, colour, obj in facts]
    name, colour, obj = facts[asked]
    prompt = f"Facts: {' '.join(sentences)}\nQuestion: What does {name} keep?\nAnswer:"
    return Example(prompt, f" a {colour} {obj}.", sentences[asked])


def make_dataset(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def chat_messages(example: Example) -> list[dict]:
    """The example as a conversation: the facts and question from the user, the answer from the assistant."""
    question = example.prompt.removesuffix("\nAnswer:")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": example.answer.strip()}]


def chat_pairs(examples: list[Example], tokenizer) -> list[tuple[str, str]]:
    """Training pairs in the tokenizer's chat template: (conversation up to the answer, answer + end of turn)."""
    pairs = []
    for example in examples:
        messages = chat_messages(example)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        pairs.append((prompt, full[len(prompt):]))
    return pairs


def make_chat_probes(n: int = 4, seed: int = 1234) -> ProbeSet:
    """The held-out probes of :func:`make_probes` as conversations (rendered by the model's chat template)."""
    examples = make_dataset(n, seed)
    return ProbeSet([Probe(chat_messages(e), evidence=(e.evidence,), name=f"probe_{i}") for i, e in enumerate(examples)])


def make_probes(n: int = 4, seed: int = 1234) -> ProbeSet:
    """Held-out probes (another seed than the training data), each with its evidence sentence."""
    examples = make_dataset(n, seed)
    return ProbeSet([Probe(e.prompt, e.answer, (e.evidence,), f"probe_{i}") for i, e in enumerate(examples)])
