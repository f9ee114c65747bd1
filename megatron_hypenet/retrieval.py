"""RULER-style retrieval tasks built locally, and their scoring by teacher forcing.

Prompts are made of the synthetic corpus' own pieces (`megatron_hypenet.corpus`) and sized with the
evaluated model's tokenizer: each prompt has at most `length` tokens, and is shorter by less than
one filler unit (a sentence or a key-value item). Example i depends only on (task, seed, i): the
same haystack and needle value are used at every length, so lengths compare like with like. Every
answer is a held-out value (`corpus.is_held_out`): the synthetic corpus never states these facts.

With a `TextFiller` the needle and pass-key haystacks are real held-out text instead (for a model
trained on real text, where the grammar's prose would be out of distribution): consecutive
blank-line-separated blocks of its documents from a random start, the needle one more block. The
needle is then a Python assignment asked for by its left-hand side (`corpus.code_needle_case`).
"""

import json
import random
import re
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_hypenet.corpus import (
    RetrievalCase,
    code_needle_case,
    filler_sentences,
    kv_case,
    kv_pairs,
    needle_case,
    passkey_case,
)

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids LongTensor[B, T] -> logits[B, T, V]


class TextFiller:
    """Haystack units from real documents: their blank-line-separated blocks (blocks longer than
    `max_unit_chars` cut at line ends), drawn in document order from a random start and joined by a
    blank line, as in the documents themselves."""

    joins = ("\n\n", "\n\n")  # between units, and before the question

    def __init__(self, texts: Iterable[str], max_unit_chars: int = 400):
        self.units = []
        for text in texts:
            for block in re.split(r"\n[ \t]*\n", text):
                block = block.strip("\n")
                if not block.strip():
                    continue
                lines, size = [], 0
                for line in block.split("\n"):
                    if lines and size + len(line) > max_unit_chars:
                        self.units.append("\n".join(lines))
                        lines, size = [], 0
                    lines.append(line)
                    size += len(line) + 1
                self.units.append("\n".join(lines))
        if not self.units:
            raise ValueError("TextFiller: the documents hold no text")

    @classmethod
    def from_jsonl(cls, path: str, json_key: str = "text", **kwargs) -> "TextFiller":
        with open(path, encoding="utf-8") as f:
            return cls((json.loads(line)[json_key] for line in f if line.strip()), **kwargs)

    def stream(self, rng: random.Random) -> Iterator[str]:
        """Endless: after the last unit comes the first (short texts still fill long prompts)."""
        i = rng.randrange(len(self.units))
        while True:
            yield self.units[i % len(self.units)]
            i += 1


SYNTHETIC_JOINS = (" ", "\n")  # the grammar's sentences are joined by a space; the question follows a newline


class RetrievalExample(NamedTuple):
    prompt_ids: list[int]
    answer_ids: list[int]
    meta: dict  # task, length (prompt tokens), target_length, depth, index


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if text and not ids:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) encodes {text[:40]!r} "
                         f"to nothing: it is empty or broken; load the teacher's tokenizer folder")
    return ids


def _make_example(tokenizer, task: str, length: int, depth: float, index: int,
                  case: RetrievalCase, units: Iterator[str],
                  joins: tuple[str, str] = SYNTHETIC_JOINS) -> RetrievalExample:
    sep, end = joins  # between the haystack's units, and between the haystack and the question
    answer_ids = _encode(tokenizer, case.answer)
    if _encode(tokenizer, case.question + case.answer) != _encode(tokenizer, case.question) + answer_ids:
        raise ValueError(f"{task}: the tokenizer merges tokens across the question/answer boundary "
                         f"({case.question + case.answer!r}); the answer cannot be scored token by token")
    fixed = len(_encode(tokenizer, case.needle + end + case.question))
    if fixed > length:
        raise ValueError(f"{task}: length={length} tokens cannot hold the needle and the question "
                         f"({fixed} tokens)")
    # Per-unit counts (with the joining space) predict the joined length closely for byte-level
    # BPE; the exact check below only has to drop the odd unit.
    haystack, estimate = [], fixed
    for unit in units:
        estimate += len(_encode(tokenizer, sep + unit))
        if estimate > length:
            break
        haystack.append(unit)
    while True:  # ends: with no haystack left the prompt is the `fixed` tokens
        text = haystack.copy()
        text.insert(round(depth * len(haystack)), case.needle)
        prompt_ids = _encode(tokenizer, sep.join(text) + end + case.question)
        if len(prompt_ids) <= length:
            break
        haystack.pop()
    meta = {"task": task, "length": len(prompt_ids), "target_length": length, "depth": depth, "index": index,
            "needle": case.needle}
    return RetrievalExample(prompt_ids, answer_ids, meta)


def _make_examples(tokenizer, task: str, length: int, num: int, seed: int, depths: Sequence[float],
                   make_case: Callable[[random.Random], tuple[RetrievalCase, Iterator[str]]],
                   joins: tuple[str, str] = SYNTHETIC_JOINS) -> list[RetrievalExample]:
    """`num` examples; example i has its needle at depth depths[i % len(depths)]."""
    examples = []
    for index in tqdm(range(num), desc=f"{task}@{length}", unit="example", leave=False):
        case, units = make_case(random.Random(f"{task}:{seed}:{index}"))
        examples.append(_make_example(tokenizer, task, length, depths[index % len(depths)], index, case, units, joins))
    return examples


def make_needle_examples(tokenizer, length: int, num: int, seed: int = 0, depths: Sequence[float] = DEFAULT_DEPTHS,
                         filler: Optional[TextFiller] = None) -> list[RetrievalExample]:
    """Single needle ("The secret number of Alice is 48213.") in filler prose; with `filler`,
    the line "alice_secret_number = 48213" in real text, asked for by "alice_secret_number ="."""
    if filler is not None:
        return _make_examples(tokenizer, "needle", length, num, seed, depths,
                              lambda rng: (code_needle_case(rng, held_out=True), filler.stream(rng)), filler.joins)
    return _make_examples(tokenizer, "needle", length, num, seed, depths,
                          lambda rng: (needle_case(rng, held_out=True), filler_sentences(rng)))


def make_passkey_examples(tokenizer, length: int, num: int, seed: int = 0, depths: Sequence[float] = DEFAULT_DEPTHS,
                          filler: Optional[TextFiller] = None) -> list[RetrievalExample]:
    """Pass key retrieval (Mohtashami & Jaggi) with the corpus' filler prose (or `filler`'s text) as haystack."""
    units = filler.stream if filler is not None else filler_sentences
    return _make_examples(tokenizer, "passkey", length, num, seed, depths,
                          lambda rng: (passkey_case(rng, held_out=True), units(rng)),
                          filler.joins if filler is not None else SYNTHETIC_JOINS)


def make_kv_examples(tokenizer, length: int, num: int, seed: int = 0,
                     depths: Sequence[float] = DEFAULT_DEPTHS) -> list[RetrievalExample]:
    """Multi-key retrieval: a prompt full of "key 7f3a: 219." items, one key queried."""
    return _make_examples(tokenizer, "kv", length, num, seed, depths,
                          lambda rng: (kv_case(rng, held_out=True)[0], kv_pairs(rng)))


@torch.no_grad()
def retrieval_accuracy(logits_fn: LogitsFn, examples: Sequence[RetrievalExample],
                       batch_size: int = 1) -> tuple[float, list[dict]]:
    """Exact-match accuracy of greedy decoding, from one teacher-forced forward per batch.

    Greedy decoding reproduces the answer iff the argmax at every answer position is the answer
    token (the earlier answer tokens it conditions on are then the true ones), so no generate().
    Returns (accuracy, per-example dicts: meta + correct, predicted_ids, answer_ids).
    """
    if not examples:
        raise ValueError("retrieval_accuracy: no examples")
    results = []
    for start in tqdm(range(0, len(examples), batch_size), desc="retrieval", unit="batch", leave=False):
        batch = examples[start:start + batch_size]
        sequences = [example.prompt_ids + example.answer_ids for example in batch]
        width = max(map(len, sequences))
        # Right padding: a causal model's logits at real positions never see the padding.
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], dtype=torch.long)
        logits = logits_fn(input_ids)
        for row, example in enumerate(batch):
            first = len(example.prompt_ids) - 1  # logits at position t predict token t + 1
            predicted = logits[row, first:first + len(example.answer_ids)].argmax(-1).tolist()
            results.append({**example.meta, "correct": predicted == example.answer_ids,
                            "predicted_ids": predicted, "answer_ids": example.answer_ids})
    return sum(r["correct"] for r in results) / len(results), results


@torch.no_grad()
def lm_loss(logits_fn: LogitsFn, token_batches: Iterable) -> float:
    """Mean next-token cross-entropy over all predicted tokens.

    A batch is a LongTensor[B, T] of token ids, or a dict from `megatron_hypenet.data` datasets
    (tokens, labels, loss_mask), whose masked-out positions are not counted.
    """
    total, count = 0.0, 0.0
    for batch in tqdm(token_batches, desc="lm loss", unit="batch", leave=False):
        if isinstance(batch, dict):
            inputs, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        else:
            inputs, labels = batch[:, :-1], batch[:, 1:]
            mask = torch.ones(labels.shape)
        logits = logits_fn(inputs).float()
        losses = F.cross_entropy(logits.flatten(0, 1), labels.to(logits.device).flatten(), reduction="none")
        mask = mask.to(losses.device, torch.float32).flatten()
        total += (losses * mask).sum().item()
        count += mask.sum().item()
    if count == 0:
        raise ValueError("lm_loss: no tokens to score")
    return total / count
