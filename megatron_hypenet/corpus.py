"""Deterministic synthetic English-like corpus for the embedded CPU demo (no downloads).

Documents are either filler prose from a small grammar, or retrieval documents that teach copying
from context: needle facts buried in filler and asked about at the end, pass keys, and key-value
lists queried by key. `megatron_hypenet.retrieval` builds its evaluation prompts from the same
pieces (`filler_sentences`, `needle_case`, `passkey_case`, `kv_case`; `kv_pairs` adds unqueried
distractors to its lists), so the teacher is evaluated on exactly the style it was trained on, but
never on a fact it was trained on: answers are split by `is_held_out` into those the corpus uses and
those only the evaluation uses.

Every document depends only on (seed, index): document i is the same whatever num_docs is.
"""

import json
import os
import random
import re
import zlib
from typing import Iterator, NamedTuple

from tqdm import tqdm

NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Liam Mia Noah Olivia Peter "
    "Quinn Rosa Sam Tara Umar Vera Walter Xenia Yusuf Zoe Anna Ben Clara Daniel Elena Felix Hannah "
    "Isaac Julia Kevin Laura Marco Nina Oscar Paula Ruth Simon Tom Ursula Victor Wendy Adam Bella "
    "Colin Diana Ethan Fiona George Helen Ivan Jasmine Leo Maya Nora Owen"
).split()
NOUNS = (
    "river garden window letter bridge market teacher doctor farmer painter sailor baker horse "
    "dog cat bird lamp table chair book song story road city village forest mountain lake island "
    "castle tower boat train ship kitchen school library museum hospital station harbor field "
    "meadow hill valley stone coin key map clock bell basket ladder blanket candle cup plate "
    "apple bread cheese cake soup tea coffee orange lemon flower tree leaf cloud storm wind "
    "machine engine wheel hammer rope shirt coat hat shoe bag box door wall roof garden gate"
).split()
ADJECTIVES = (
    "old young small large quiet loud bright dark warm cold green blue red yellow heavy light "
    "strange famous gentle careful busy lazy happy sad clever simple tall short narrow wide "
    "ancient modern empty crowded wet dry soft hard clean dirty kind brave calm proud rare "
    "sudden wooden golden silver broken hidden"
).split()
VERBS = (  # transitive, past tense
    "found lost painted carried opened closed cleaned built visited watched followed described "
    "repaired sold bought borrowed returned moved dropped lifted pushed pulled noticed remembered "
    "forgot washed cooked planted measured counted drew wrote read studied guarded"
).split()
INTRANSITIVE = (  # intransitive, past tense
    "waited laughed slept arrived left smiled sang danced worked rested listened wandered "
    "shouted whispered paused returned stayed hurried cried"
).split()
PLACES = (
    "the old mill|the harbor|the quiet square|the north road|the market hall|the village green|"
    "the forest edge|the train station|the library steps|the river bank|the high street|"
    "the city park|the school yard|the farm house|the lighthouse|the small chapel|the bakery|"
    "the town hall|the bus stop|the garden wall"
).split("|")
TIMES = (
    "in the morning|at noon|in the evening|at night|on Monday|on Friday|last winter|"
    "every summer|after the rain|before dinner|during the storm|at dawn|later that day|"
    "the next week|once a year|long ago|in the spring|after school"
).split("|")
ADVERBS = (
    "slowly quickly quietly carefully happily suddenly gently loudly patiently nervously "
    "proudly calmly eagerly softly"
).split()
PEOPLE = "children neighbors workers students travelers farmers sailors visitors".split()
NUMBER_WORDS = "two three four five six seven eight nine ten twelve".split()

TEMPLATES = (
    "{Name} {verb} the {adj} {noun} near {place}.",
    "The {noun} in {place} was {adj} {time}.",
    "{Time}, {name} {verb} a {adj} {noun} {adverb}.",
    "{Name} said that the {noun} was {adj} and {adj2}.",
    "When the {noun} {verb} the {noun2}, the {people} {intransitive} {adverb}.",
    "A {adj} {noun} {intransitive} near {place}.",
    "{Name} and {name2} {verb} the {noun} {time}.",
    "It was {adj} {time}, so {name} stayed at {place}.",
    "Nobody knew why the {noun} was so {adj}.",
    "The {people} {intransitive} while {name} {verb} the {noun}.",
    "There were {number} {adj} {noun}s behind {place}.",
    "{Name} {intransitive} {adverb} because the {noun} was {adj}.",
    "Did {name} really see a {adj} {noun} {time}?",
    "The {adj} {noun} belonged to {name}, who lived near {place}.",
    "{Name} wrote a story about a {noun} and a {adj} {noun2}.",
    "Everyone in {place} remembered the {adj} {noun}.",
)


def filler_sentence(rng: random.Random) -> str:
    """One sentence of the grammar (no digits, so retrieval answers are the only numbers)."""
    time = rng.choice(TIMES)
    name = rng.choice(NAMES)
    sentence = rng.choice(TEMPLATES).format(
        Name=name, name=name, name2=rng.choice(NAMES), noun=rng.choice(NOUNS),
        noun2=rng.choice(NOUNS), adj=rng.choice(ADJECTIVES), adj2=rng.choice(ADJECTIVES),
        verb=rng.choice(VERBS), intransitive=rng.choice(INTRANSITIVE), place=rng.choice(PLACES),
        time=time, Time=time[0].upper() + time[1:], adverb=rng.choice(ADVERBS),
        people=rng.choice(PEOPLE), number=rng.choice(NUMBER_WORDS),
    )
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", sentence)


def filler_sentences(rng: random.Random) -> Iterator[str]:
    """Endless filler: the haystack of every retrieval document."""
    while True:
        yield filler_sentence(rng)


class RetrievalCase(NamedTuple):
    """A fact hidden in a document, the question closing the document, and its answer.

    The answer starts with a space and the question has none at its end, so for byte-level BPE
    tokenizers tokens(question + answer) == tokens(question) + tokens(answer).
    """

    needle: str
    question: str
    answer: str


HELD_OUT_EVERY = 4  # one answer value in 4 is reserved for evaluation


def is_held_out(value: str) -> bool:
    """Whether `value` (a number or a kv key) is reserved for evaluation prompts.

    Corpus documents never contain a held-out value and evaluation questions only ask for held-out
    ones, whatever the seeds, so no evaluation example is trained on. A hash, not a range: both sets
    look alike (same digits, same lengths) to a model.
    """
    return zlib.crc32(value.encode()) % HELD_OUT_EVERY == 0


def _draw(rng: random.Random, make, held_out: bool) -> str:
    while True:
        value = make(rng)
        if is_held_out(value) == held_out:
            return value


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10_000, 100_000))


def _kv_key(rng: random.Random) -> str:
    return f"{rng.randrange(16**4):04x}"


def needle_case(rng: random.Random, name: str | None = None, held_out: bool = False) -> RetrievalCase:
    name = name or rng.choice(NAMES)
    number = _draw(rng, _number, held_out)
    return RetrievalCase(
        needle=f"The secret number of {name} is {number}.",
        question=f"What is the secret number of {name}? The secret number of {name} is",
        answer=f" {number}",
    )


def code_needle_case(rng: random.Random, held_out: bool = False) -> RetrievalCase:
    """The needle for haystacks of Python sources and docs: an assignment, asked for by repeating its
    left-hand side, so a code model answers by copying the value it saw (as it copies identifiers)."""
    name = f"{rng.choice(NAMES).lower()}_secret_number"
    number = _draw(rng, _number, held_out)
    return RetrievalCase(needle=f"{name} = {number}", question=f"{name} =", answer=f" {number}")


def passkey_case(rng: random.Random, held_out: bool = False) -> RetrievalCase:
    key = _draw(rng, _number, held_out)
    return RetrievalCase(
        needle=f"The pass key is {key}. Remember it. {key} is the pass key.",
        question="What is the pass key? The pass key is",
        answer=f" {key}",
    )


def kv_pairs(rng: random.Random) -> Iterator[str]:
    """Endless "key 7f3a: 219." distractors with distinct keys, none held out (so never the key an
    evaluation prompt queries)."""
    seen = set()
    while True:
        key = _draw(rng, _kv_key, held_out=False)
        if key not in seen:
            seen.add(key)
            yield f"key {key}: {rng.randrange(100, 1000)}."


def kv_case(rng: random.Random, held_out: bool = False) -> tuple[RetrievalCase, str]:
    """The queried pair, and its key (to keep the keys of a list distinct)."""
    key, value = _draw(rng, _kv_key, held_out), rng.randrange(100, 1000)
    return RetrievalCase(needle=f"key {key}: {value}.", question=f"Query key {key}:", answer=f" {value}"), key


def approx_tokens(text: str) -> int:
    """Token estimate before any tokenizer exists (digits are split one per token)."""
    return round(1.3 * len(text.split())) + sum(ch.isdigit() for ch in text)


def _take(units: Iterator[str], num_tokens: int) -> list[str]:
    taken, total = [], 0
    while total < num_tokens:
        taken.append(next(units))
        total += approx_tokens(taken[-1])
    return taken


def _haystack_document(units: list[str], needles: list[str], cases: list[RetrievalCase], rng) -> str:
    """Needles at random depths in the units, then the questions about some of them."""
    for needle in needles:
        units.insert(rng.randint(0, len(units)), needle)
    questions = [case.question + case.answer + "." for case in cases]
    return " ".join(units) + "\n" + " ".join(questions)


def make_document(seed: int, index: int, doc_tokens_hint: int = 384) -> str:
    """Document `index` of the corpus for `seed`: about `doc_tokens_hint` (+-50%) estimated tokens
    (`approx_tokens`) of filler or key-value list, plus the questions."""
    rng = random.Random(f"corpus:{seed}:{index}")
    budget = int(doc_tokens_hint * rng.uniform(0.5, 1.5))
    # Mostly retrieval: the answers are the only copy lessons, a few tokens per document.
    kind = rng.choices(("filler", "needle", "passkey", "kv"), weights=(1, 3, 2, 4))[0]
    if kind == "filler":
        sentences = _take(filler_sentences(rng), budget)
        cut = rng.randint(1, len(sentences))  # two paragraphs, like real documents
        return "\n\n".join(" ".join(part) for part in (sentences[:cut], sentences[cut:]) if part)
    if kind == "needle":
        # Several facts with distinct names: copying must match the name, not just the phrase.
        names = rng.sample(NAMES, rng.randint(1, 4))
        cases = [needle_case(rng, name) for name in names]
        asked = rng.sample(cases, len(cases))  # every fact, in a new order: each question is a copy lesson
        return _haystack_document(_take(filler_sentences(rng), budget), [c.needle for c in cases], asked, rng)
    if kind == "passkey":
        case = passkey_case(rng)
        return _haystack_document(_take(filler_sentences(rng), budget), [case.needle], [case], rng)
    # A list whose every key is then queried, in a new order: many copy lessons per document.
    cases = {}
    while len(cases) < max(2, budget // 8):
        case, key = kv_case(rng)
        cases[key] = case
    return _haystack_document([], [c.needle for c in cases.values()], rng.sample(list(cases.values()), len(cases)), rng)


def iter_corpus_texts(num_docs: int, seed: int = 0, doc_tokens_hint: int = 384) -> Iterator[str]:
    for index in range(num_docs):
        yield make_document(seed, index, doc_tokens_hint)


def generate_corpus(path: str, num_docs: int, seed: int = 0, doc_tokens_hint: int = 384) -> str:
    """Write the corpus as JSONL ({"text": ...} per line), atomically; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        texts = iter_corpus_texts(num_docs, seed, doc_tokens_hint)
        for text in tqdm(texts, total=num_docs, desc="synthetic corpus", unit="doc"):
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return path
