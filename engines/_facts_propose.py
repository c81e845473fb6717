"""Drafts of facts checks from a prompt's text (`engines.facts.propose_facts`).

Deterministic and model-free: the prompt is split into markdown sections,
paragraphs and sentences; each sentence's checkable values (money,
percentages, times, dates, durations, addresses, numbers with units, and
capitalised names where it has no other value) become one draft each. A
draft's `question` asks for the subject the value is about: the name nearest
to the value in its sentence when there is one, else the distinctive words of
its clause, plus words a user asks that kind of value with ("how much",
"when"). Words and names found all over the prompt (the brand, "traveller")
say nothing about one fact and are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MAX_NAME_CHARS = 100
MAX_SOURCE_CHARS = 5_000

_NUM = r"\d+(?:[.,]\d+)*"
_WORD_NUM = r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|sixty)"
_MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
_MONTH = rf"(?:{_MONTHS}|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)\.?"
_DAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_UNIT_TIME = (
    r"(?:seconds?|minutes?|mins?|hours?|hrs?|(?:working |business |calendar )?days?|weeks?|months?|years?)"
)
_CURRENCY = r"(?:euros?|eur|dollars?|usd|pounds?|gbp|cents?|pence|francs?|chf|yen)"
_UNITS = r"(?:kg|g|km|m|cm|mm|mi|ft|gb|mb|tb|kb|mph|km/h|kwh|w|kw|l|ml)"

# (kind, pattern), tried in order; a later match overlapping an earlier one is dropped.
_VALUES: list[tuple[str, re.Pattern[str]]] = [
    (
        "address",
        re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\bhttps?://[^\s<>()\"']+|\bwww\.[^\s<>()\"']+", re.I),
    ),
    ("address", re.compile(r"(?<![\w+])\+?\d[\d ()-]{6,}\d\b")),  # phone numbers
    (
        "money",
        re.compile(rf"[€$£¥]\s?{_NUM}|\b{_NUM}\s?(?:[€$£¥]|{_CURRENCY}\b)|\b{_CURRENCY}\s?{_NUM}\b", re.I),
    ),
    ("percentage", re.compile(rf"\b{_NUM}\s?(?:%|percent\b|per cent\b)", re.I)),
    (
        "time",
        re.compile(
            r"\b(?:[01]?\d|2[0-3]):[0-5]\d\b(?:\s?[ap]\.?m\b\.?)?|\b(?:1[0-2]|0?[1-9])\s?[ap]\.?m\b", re.I
        ),
    ),
    (
        "date",
        re.compile(
            rf"\b\d{{4}}-\d\d-\d\d\b|\b\d{{1,2}}/\d{{1,2}}/\d{{2,4}}\b"
            rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s(?:of\s)?{_MONTH}(?:\s\d{{4}})?\b"
            rf"|\b{_MONTH}\s\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s\d{{4}})?\b",
            re.I,
        ),
    ),
    (
        "duration",
        re.compile(
            rf"\b(?:{_NUM}|{_WORD_NUM}|an)\s{_UNIT_TIME}(?:,?\s(?:and\s)?(?:{_NUM}|{_WORD_NUM})\s{_UNIT_TIME})?\b",
            re.I,
        ),
    ),
    ("date", re.compile(rf"\b(?:{_MONTHS.title()}|{_DAYS.title()})\b")),
    ("number", re.compile(rf"\b{_NUM}(?:\s?(?:to|-|–)\s?{_NUM})?(?:\s?{_UNITS}\b|\s[a-z]+s\b)?", re.I)),
]
# Values given as examples of a form ("such as 06:30 or 18:30") are not facts of the prompt.
_EXAMPLE = re.compile(r"\b(?:such as|e\.g\.|for example|for instance)[^;.]*$", re.I)
# Sentences about how replies are written state rules, not facts.
_ABOUT_REPLIES = re.compile(r"\b(?:repl(?:y|ies)|responses?)\b", re.I)

_KIND_WORDS = {
    "money": "how much|cost|price|fare|fee|pay|charge|expensive|cheap",
    "percentage": "discount|percent|off|cheaper|reduc|saving|how much",
    "duration": "how long|long|take|time|duration|minute|hour|wait|within",
    "time": "when|what time|time|leave|depart|schedule|timetable|open|close|first|last",
    "date": "when|date|season|month|day|open|start|until",
    "address": "email|e-mail|mail|contact|address|reach|website|site|link|phone|call|number",
    "number": "how many|how much|number|how old|age|limit|maximum|minimum|at least|at most|more than",
    "name": "who|which|what|where|name|called",
}
_STOP = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each every few for from further get gets got had
    has have having he her here hers him his how i if in into is it its itself just least less let like made make
    many may me might more most much must my no nor not now of off on once only or other our ours out over own per
    same she should so some such than that the their them then there these they this those through to too under
    until up upon very via was we were what when where which while who whom why will with within without would you
    your yours plus either neither anything something everything nothing instead still already always never ever
    often usually whatever whoever one two three four five six seven eight nine ten""".split()
)
_WORD = re.compile(r"[^\W\d_][\w'-]*")
_CAPITALISED = re.compile(r"\b(?:[A-Z][\w'-]*)(?:\s(?:of\s|the\s|de\s)?[A-Z][\w'-]*)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_MARK = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+")
_CLAUSE = re.compile(r"[;:,]\s|\s(?:and|but|while|whereas)\s")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_NAME_OF_DATE = re.compile(rf"(?:{_MONTHS}|{_DAYS})", re.I)

Span = tuple[int, int, str]


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, sentences) per markdown section: paragraphs and list items
    are split, then sentences. Table rows are skipped."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            joined = " ".join(paragraph)
            sections[-1][1].extend(s.strip() for s in _SENTENCE_END.split(joined) if s.strip())
            paragraph.clear()

    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            flush()
            sections.append((heading.group(1), []))
        elif not line.strip() or line.lstrip().startswith("|"):
            flush()
        elif _LIST_MARK.match(line):
            flush()
            paragraph.append(_LIST_MARK.sub("", line).strip())
        else:
            paragraph.append(line.strip())
    flush()
    return [s for s in sections if s[1]]


def _stem(word: str) -> str:
    """A prefix that matches the word's common inflections ("takes" -> "take",
    "leaving" -> "leav", "ferries" -> "ferr", "cancelled" -> "cancel")."""
    word = word.lower().strip("'-")
    if word.endswith("'s"):
        word = word[:-2]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3]
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou":
                word = word[:-1]
            return word
    return word


def _find_values(sentence: str) -> list[Span]:
    found: list[Span] = []
    occupied: list[tuple[int, int]] = []
    for kind, pattern in _VALUES:
        for m in pattern.finditer(sentence):
            start = m.start()
            text = m.group().rstrip(".,;:")
            end = start + len(text)
            if any(s < end and start < e for s, e in occupied):
                continue
            occupied.append((start, end))
            if kind == "number" and (
                sentence[end : end + 1] == "-" or sentence[max(start - 1, 0) : start] == "-"
            ):
                continue  # "30-day", "under-5s": part of a word
            if kind == "date" and start == 0 and text in ("May", "March"):
                continue  # a sentence's first word: the verb, not the month
            if _EXAMPLE.search(sentence[:start]):
                continue
            found.append((start, end, kind))
    return sorted(found)


def _names(sentence: str, capitalised_inside: set[str]) -> list[Span]:
    """Capitalised names: a run of capitalised words not at the sentence's
    start, or at its start when the prompt also writes that word capitalised
    mid-sentence ("Port Ellis to Gull Island takes 40 minutes")."""
    out: list[Span] = []
    for m in _CAPITALISED.finditer(sentence):
        text = m.group()
        first = text.split()[0]
        at_start = not sentence[: m.start()].strip(" \"'(*")
        if at_start and first not in capitalised_inside:
            text = text[len(first) :].strip()
        if text and not _NAME_OF_DATE.fullmatch(text):
            out.append((m.end() - len(text), m.end(), text))
    return out


def _alternatives(words: Iterable[str]) -> str:
    """Words joined as regex alternatives, a word dropped when another is its prefix."""
    kept: list[str] = []
    for w in words:
        if w and not any(w.startswith(k) for k in kept):
            kept = [k for k in kept if not k.startswith(w)] + [w]
    return "|".join(re.escape(w).replace("\\ ", " ") for w in kept)


class _Prompt:
    """The prompt's sections and how often each word and name occurs in it."""

    def __init__(self, text: str) -> None:
        self.sections = _sections(text)
        sentences = [s for _, ss in self.sections for s in ss]
        self.capitalised_inside = {w for s in sentences for w in re.findall(r"(?<=[a-z,;:] )[A-Z][\w'-]*", s)}
        words: dict[str, int] = {}
        name_sentences: dict[str, int] = {}
        name_sections: dict[str, int] = {}
        for _, section in self.sections:
            in_section: set[str] = set()
            for s in section:
                for w in {_stem(w) for w in _WORD.findall(s)}:
                    words[w] = words.get(w, 0) + 1
                for n in {n.lower() for *_, n in _names(s, self.capitalised_inside)}:
                    name_sentences[n] = name_sentences.get(n, 0) + 1
                    in_section.add(n)
            for n in in_section:
                name_sections[n] = name_sections.get(n, 0) + 1
        self.common_words = {w for w, c in words.items() if c > max(3, len(sentences) // 4)}
        many_sections = len(self.sections) >= 4
        self.common_names = {
            n
            for n, c in name_sentences.items()
            if c > max(3, len(sentences) // 4)
            or (many_sections and name_sections[n] > len(self.sections) / 2)
        }

    def words(self, text: str, skip: set[str]) -> list[tuple[str, str]]:
        """(stem, word) of the distinctive words of the text."""
        out: list[tuple[str, str]] = []
        for w in _WORD.findall(text):
            stem = _stem(w)
            if (
                w.lower() not in _STOP
                and len(stem) >= 3
                and stem not in self.common_words
                and stem not in skip
            ):
                if stem not in (s for s, _ in out):
                    out.append((stem, w.lower()))
        return out


def propose_facts(prompt_text: str) -> list[dict[str, Any]]:
    """Draft facts checks (name, question, expect, source) for the team to accept."""
    prompt = _Prompt(prompt_text)
    proposals: list[dict[str, Any]] = []
    taken: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for heading, sentences in prompt.sections:
        heading_words = [s for s, _ in prompt.words(heading, set())]
        for sentence in sentences:
            if _ABOUT_REPLIES.search(sentence) or len(sentence) > MAX_SOURCE_CHARS:
                continue
            all_names = _names(sentence, prompt.capitalised_inside)
            names = [n for n in all_names if n[2].lower() not in prompt.common_names]
            values = _find_values(sentence)
            if not values:
                values = [(s, e, "name") for s, e, _ in names]
            for start, end, kind in values:
                expect = sentence[start:end]
                question, subject = _question(
                    prompt, sentence, (start, end, kind), names, all_names, heading_words
                )
                if question is None or (question, expect.lower()) in seen:
                    continue
                seen.add((question, expect.lower()))
                name = _unique(f"{subject} {expect}".lower(), taken)
                proposals.append({"name": name, "question": question, "expect": expect, "source": sentence})
    return proposals


def _question(
    prompt: _Prompt,
    sentence: str,
    value: Span,
    names: list[Span],
    all_names: list[Span],
    heading_words: list[str],
) -> tuple[str | None, str]:
    """The question regex for the value and a short subject for its name:
    `names` may anchor it, no word of `all_names` is a topic word."""
    start, end, kind = value
    bounds = [0, *(m.end() for m in _CLAUSE.finditer(sentence)), len(sentence)]
    clause_start = max(b for b in bounds if b <= start)
    clause_end = min(b for b in bounds if b >= end)
    others = [n for n in names if not (n[0] < end and start < n[1])] if kind != "name" else []
    in_clause = [n for n in others if clause_start <= n[0] and n[1] <= clause_end]
    candidates = in_clause or others
    # "6 euros from Gull Island to Kestrel Point": the destination is what the value is about.
    candidates = [n for n in candidates if sentence[: n[0]].endswith(" to ")] or candidates
    nearest = min(candidates, key=lambda n: min(abs(n[0] - end), abs(start - n[1])), default=None)

    kind_words = _KIND_WORDS[kind].split("|")
    skip = {_stem(w) for n in all_names for w in n[2].split()} | set(kind_words)
    clause = prompt.words(sentence[clause_start:start] + " " + sentence[end:clause_end], skip)
    if len(clause) < 2:
        clause += [w for w in prompt.words(sentence, skip) if w not in clause]
    clause = clause[:6]
    stems = [s for s, _ in clause]
    if nearest is not None:
        anchor = re.escape(nearest[2].lower()).replace("\\ ", " ")
        topic = _alternatives([*stems, *heading_words[:2], *kind_words])
        subject = " ".join([nearest[2], *(w for _, w in clause[:1])])
        return rf"(?s)^(?=.*\b{anchor})(?=.*\b(?:{topic}))", subject
    if not clause:
        return None, ""
    topic = _alternatives([*heading_words[:2], *kind_words])
    subject = " ".join(w for _, w in clause[:2])
    return rf"(?s)^(?=.*\b(?:{_alternatives(stems)}))(?=.*\b(?:{topic}))", subject


def _unique(name: str, taken: set[str]) -> str:
    name = " ".join(name.split())[:MAX_NAME_CHARS] or "fact"
    candidate, n = name, 2
    while candidate in taken:
        suffix = f" ({n})"
        candidate, n = name[: MAX_NAME_CHARS - len(suffix)] + suffix, n + 1
    taken.add(candidate)
    return candidate
