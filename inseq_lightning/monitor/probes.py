"""Probe sets: the fixed (prompt, target) pairs the monitor attributes at every checkpoint."""

import csv
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .chat import normalize_messages

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_EVIDENCE_MATCHES = ("word", "substring")


def safe_name(name: str) -> str:
    """A name usable as a file name and a tracker tag (letters, digits, ``_ . -``)."""
    cleaned = _SAFE_NAME.sub("_", name).strip("._") or "probe"
    return cleaned[:80]


@dataclass(frozen=True)
class Probe:
    """One probe example.

    Attributes:
        prompt: the input (decoder-only: the prompt; encoder-decoder: the source text), or a
            conversation: a list of ``{"role", "content"}`` messages, rendered with the tokenizer's
            own chat template (generation prompt included) when the probe is attributed. A
            conversation's last assistant message is the target when ``target`` is not given.
        target: the forced target. Decoder-only targets may be given with or without the prompt
            in front; the prompt is prepended when missing. ``None`` asks the model to generate it.
            For a conversation: the assistant's answer (text, or TRL's ``[{"role": "assistant",
            "content": ...}]`` completion); only its content tokens are attributed steps.
        evidence: what a correct model should rely on, in the prompt: words/phrases (every
            occurrence counts) or ``(start, end)`` character spans. A token is evidence when one of
            its non-whitespace characters lies in the evidence, so the space a byte-level BPE
            (``Ġ``) or Metaspace (``▁``) token carries in front of its word never makes it evidence.
        name: a unique name, used in tags and file names.
        evidence_match: how words/phrases are found: ``"word"`` (default) matches whole words only,
            so ``"Leo"`` does not match inside ``"Leonard"``; ``"substring"`` matches anywhere.
        evidence_ignore_case: match words/phrases whatever their case.
        cue: what the answer must NOT rely on (a canary: a planted trigger, a shortcut), given and
            matched like ``evidence`` (same ``evidence_match`` and ``evidence_ignore_case``); the
            monitor logs ``cue_mass``, the share of attribution on these tokens. A list, a tuple, or
            one string (words separated by ``|``).

    In a conversation, evidence and cue are words or phrases found in any message's content (never
    in the template's own text).
    """

    prompt: str | tuple[dict, ...]
    target: str | None = None
    evidence: tuple[str | tuple[int, int], ...] = ()
    name: str = ""
    evidence_match: str = "word"
    evidence_ignore_case: bool = False
    cue: tuple[str | tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "cue", _evidence(self.cue))
        if self.evidence_match not in _EVIDENCE_MATCHES:
            raise InvalidInputError(
                f"Probe {self.name!r}: evidence_match={self.evidence_match!r}; pass \"word\" to match whole words "
                "or \"substring\" to match inside words"
            )
        if not isinstance(self.prompt, str):
            self._set_conversation()

    def _set_conversation(self) -> None:
        where = f"Probe {self.name!r}" if self.name else "Probe"
        messages = normalize_messages(self.prompt, where)
        target = self.target
        if isinstance(target, (list, tuple)):  # TRL's conversational completion
            answer = normalize_messages(target, where)
            if len(answer) != 1 or answer[0]["role"] != "assistant":
                raise InvalidInputError(f"{where}: a conversational completion is one assistant message")
            target = answer[0]["content"]
        if target is None and messages[-1]["role"] == "assistant":
            messages, target = messages[:-1], messages[-1]["content"]
        if not messages:
            raise InvalidInputError(f"{where}: the conversation has only the assistant's answer; add the user turn")
        if messages[-1]["role"] == "assistant":
            raise InvalidInputError(f"{where}: the conversation ends with two assistant turns in a row; the last one "
                                    "is the answer, so the one before it must be followed by a user turn")
        if target is not None and not target.strip():
            raise InvalidInputError(f"{where}: the assistant's answer is empty")
        for label, items in (("evidence", self.evidence), ("cue", self.cue)):
            if any(not isinstance(item, str) for item in items):
                raise InvalidInputError(f"{where}: {label} in a conversation is words or phrases found in its "
                                        "messages, not character spans")
        object.__setattr__(self, "prompt", messages)
        object.__setattr__(self, "target", target)

    @property
    def is_chat(self) -> bool:
        """Whether the prompt is a conversation (rendered with the tokenizer's chat template)."""
        return not isinstance(self.prompt, str)

    @property
    def messages(self) -> tuple[dict, ...]:
        """The conversation before the answer (empty for a plain-text probe)."""
        return self.prompt if self.is_chat else ()

    @property
    def display_prompt(self) -> str:
        """The prompt as one line of text, for tables and titles."""
        if not self.is_chat:
            return self.prompt
        return " | ".join(f"{m['role']}: {m['content']}" for m in self.messages)

    def evidence_spans(self, text: str | None = None, regions: list[tuple[int, int]] | None = None,
                       ) -> list[tuple[int, int]]:
        """Character spans of the evidence in ``prompt`` (or in ``text``, a rendering of it, searched
        only inside ``regions``: the messages' contents in a rendered conversation)."""
        return self._spans(self.evidence, "evidence", text, regions)

    def cue_spans(self, text: str | None = None, regions: list[tuple[int, int]] | None = None,
                  ) -> list[tuple[int, int]]:
        """Character spans of the cue, found as :meth:`evidence_spans` finds the evidence."""
        return self._spans(self.cue, "cue", text, regions)

    def _spans(self, items: tuple, label: str, text: str | None, regions: list[tuple[int, int]] | None,
               ) -> list[tuple[int, int]]:
        if self.is_chat and text is None:  # no tokenizer yet: check each phrase occurs in some message
            for item in items:
                if not any(self._find_text(item, m["content"], label) for m in self.messages):
                    raise InvalidInputError(self._not_found(item, "in any message of its conversation", label))
            return []
        text = self.prompt if text is None else text
        regions = regions if regions is not None else [(0, len(text))]
        spans: list[tuple[int, int]] = []
        for item in items:
            if not isinstance(item, str):
                spans.append(self._check_span(item, label))
                continue
            found = [(start + s, start + e) for start, end in regions
                     for s, e in self._find_text(item, text[start:end], label)]
            if not found:
                raise InvalidInputError(self._not_found(item, "in its prompt", label))
            spans.extend(found)
        return spans

    def _not_found(self, item: str, where: str, label: str = "evidence") -> str:
        hint = ('; fix it, or pass evidence_match="substring" to match inside words'
                if self.evidence_match == "word" else "")
        case = "" if self.evidence_ignore_case else " (evidence_ignore_case=True matches whatever the case)"
        whole = " as a whole word" if self.evidence_match == "word" else ""
        return f"Probe {self.name!r}: {label} {item!r} does not occur {where}{whole}{hint}{case}"

    def _find_text(self, text: str, haystack: str, label: str = "evidence") -> list[tuple[int, int]]:
        if not text.strip():
            raise InvalidInputError(f"Probe {self.name!r}: {label} {text!r} is blank; pass a word, a phrase or a span")
        flags = re.IGNORECASE if self.evidence_ignore_case else 0
        return [(m.start(), m.end()) for m in re.finditer(self._pattern(text), haystack, flags)]

    def _pattern(self, text: str) -> str:
        pattern = re.escape(text)
        if self.evidence_match == "substring":
            return pattern
        # Only an end that is itself a word character needs a boundary: "boat." still matches "boat.\n".
        before = r"(?<!\w)" if re.match(r"\w", text[0]) else ""
        after = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
        return before + pattern + after

    def _check_span(self, item: tuple[int, int], label: str = "evidence") -> tuple[int, int]:
        start, end = int(item[0]), int(item[1])
        if not 0 <= start < end <= len(self.prompt):
            raise InvalidInputError(
                f"Probe {self.name!r}: {label} span {item!r} is outside its prompt (length {len(self.prompt)})"
            )
        return start, end


def _evidence(value: Any) -> tuple:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        # CSV cells: a JSON list, or words separated by "|".
        value = json.loads(value) if value.lstrip().startswith("[") else [v for v in value.split("|") if v]
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


@dataclass
class ProbeSet:
    """An ordered set of probes with unique names.

    Build it from lists (:meth:`from_lists`), records (:meth:`from_records`), a JSONL or CSV file
    (:meth:`from_file`) or a ``datasets.Dataset`` (:meth:`from_dataset`).

    Attributes:
        probes: the probes.
        generate: attribute the model's own greedy continuation instead of the fixed targets
            (targets then change between checkpoints, and drift is only compared where they match).
        generation_args: passed to ``model.generate`` in generate mode.
        include_template_tokens: in conversations, also attribute the chat template's tokens after
            the answer (``<|im_end|>``, ...) as steps; by default only the answer's content tokens are
            steps, so the template's tokens never enter the step scores, drift and evidence mass.
    """

    probes: list[Probe]
    generate: bool = False
    generation_args: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 10, "do_sample": False})
    include_template_tokens: bool = False

    def __post_init__(self):
        if not self.probes:
            raise InvalidInputError("A ProbeSet needs at least one probe")
        named = []
        for i, probe in enumerate(self.probes):
            if not isinstance(probe, Probe):
                raise InvalidInputError(f"Probe {i} is a {type(probe).__name__}; pass Probe objects (or use coerce)")
            if not probe.is_chat and (not isinstance(probe.prompt, str) or not probe.prompt.strip()):
                raise InvalidInputError(f"Probe {i} has an empty prompt")
            if probe.target is None and not self.generate:
                if probe.is_chat:
                    raise InvalidInputError(
                        f"Probe {i}: the conversation does not end with an assistant turn, so there is no answer "
                        "to attribute; add it as the last assistant message (or target=), or use generate=True")
                raise InvalidInputError(f"Probe {i} has no target; give one, or use generate=True")
            named.append(probe if probe.name else replace(probe, name=f"probe_{i}"))
        names = [safe_name(p.name) for p in named]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"Probe names must be unique (after sanitising): {names}")
        self.probes = [replace(p, name=n) for p, n in zip(named, names)]
        for probe in self.probes:
            probe.evidence_spans()  # fail now, not at step 1000
            probe.cue_spans()

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes)

    def __getitem__(self, index: int) -> Probe:
        return self.probes[index]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.probes]

    @classmethod
    def from_lists(cls, prompts: Sequence[str], targets: Sequence[str | None] | None = None,
                   evidence: Sequence[Sequence] | None = None, names: Sequence[str] | None = None,
                   evidence_match: str = "word", cues: Sequence[Sequence] | None = None, **kwargs) -> "ProbeSet":
        """One probe per prompt; ``evidence_match`` applies to every probe (see :class:`Probe`)."""
        n = len(prompts)
        for label, values in (("targets", targets), ("evidence", evidence), ("names", names), ("cues", cues)):
            if values is not None and len(values) != n:
                raise InvalidInputError(f"{n} prompts but {len(values)} {label}; pass one per prompt")
        return cls([
            Probe(prompts[i], targets[i] if targets is not None else None,
                  _evidence(evidence[i]) if evidence is not None else (), names[i] if names is not None else "",
                  evidence_match, cue=cues[i] if cues is not None else ())
            for i in range(n)
        ], **kwargs)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], prompt_key: str = "prompt", target_key: str = "target",
                     evidence_key: str = "evidence", name_key: str = "name", evidence_match: str = "word",
                     cue_key: str = "cue", **kwargs) -> "ProbeSet":
        """One probe per record; a record's ``evidence_match`` field overrides the ``evidence_match`` given here.

        Records may be conversations as TRL datasets write them: ``messages`` (the last assistant
        message is the answer), or a conversational ``prompt`` (a list of messages) with a
        ``completion`` (text or ``[{"role": "assistant", ...}]``); ``completion`` also stands for
        ``target`` in plain prompt/completion records."""
        probes = []
        for i, record in enumerate(records):
            prompt = record.get(prompt_key)
            if prompt is None and "messages" in record:
                prompt = record["messages"]
            if prompt is None:
                raise InvalidInputError(f"Probe record {i} has no {prompt_key!r} or 'messages' field "
                                        f"(fields: {sorted(record)})")
            target = record.get(target_key)
            if target is None:
                target = record.get("completion")
            probes.append(Probe(prompt, target or None, _evidence(record.get(evidence_key)),
                                str(record.get(name_key) or ""), record.get("evidence_match") or evidence_match,
                                bool(record.get("evidence_ignore_case", False)), record.get(cue_key)))
        return cls(probes, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "ProbeSet":
        """A ``.jsonl`` file (one JSON object per line) or a ``.csv`` file with a header row."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"Probe file {path} does not exist")
        if path.suffix == ".jsonl":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return cls.from_records([json.loads(line) for line in lines], **kwargs)
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return cls.from_records(list(csv.DictReader(handle)), **kwargs)
        raise InvalidInputError(f"Probe file {path} must end in .jsonl or .csv")

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> "ProbeSet":
        """A ``datasets.Dataset`` (or any iterable of dict rows) with prompt/target/evidence columns."""
        return cls.from_records(list(dataset), **kwargs)

    def to_state(self) -> dict:
        """A JSON-able description that :meth:`coerce` turns back into this probe set."""
        return {"probes": [{"prompt": [dict(m) for m in p.prompt] if p.is_chat else p.prompt, "target": p.target,
                            "name": p.name, "evidence": [list(e) if isinstance(e, tuple) else e for e in p.evidence],
                            "evidence_match": p.evidence_match, "evidence_ignore_case": p.evidence_ignore_case,
                            "cue": [list(e) if isinstance(e, tuple) else e for e in p.cue]}
                           for p in self.probes],
                "generate": self.generate, "generation_args": dict(self.generation_args),
                "include_template_tokens": self.include_template_tokens}

    @classmethod
    def coerce(cls, probes: "ProbeSet | Sequence | Mapping | str | Path") -> "ProbeSet":
        """Accept a ProbeSet, its :meth:`to_state`, a path, or a list of ``(prompt, target)`` pairs, dicts
        or :class:`Probe`."""
        if isinstance(probes, ProbeSet):
            return probes
        if isinstance(probes, Mapping) and "probes" in probes:
            return cls.from_records(probes["probes"], generate=bool(probes.get("generate", False)),
                                    generation_args=dict(probes.get("generation_args") or {"max_new_tokens": 10}),
                                    include_template_tokens=bool(probes.get("include_template_tokens", False)))
        if isinstance(probes, (str, Path)):
            return cls.from_file(probes)
        items = list(probes)
        if items and all(isinstance(p, Probe) for p in items):
            return cls(items)
        if items and all(isinstance(p, Mapping) for p in items):
            return cls.from_records(items)
        if items and all(isinstance(p, (tuple, list)) and len(p) in (2, 3) for p in items):
            return cls([Probe(p[0], p[1], _evidence(p[2]) if len(p) == 3 else ()) for p in items])
        raise InvalidInputError(
            "probes must be a ProbeSet, a .jsonl/.csv path, or a list of (prompt, target[, evidence]) tuples, "
            "dicts or Probe objects"
        )
