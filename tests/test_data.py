"""Data side: synthetic corpus, tokenizer training, preprocessing, trainer datasets, retrieval tasks."""

import json
import os
import re

import numpy
import pytest
import torch

from megatron_hypenet.corpus import generate_corpus, is_held_out, iter_corpus_texts
from megatron_hypenet.data import build_gpt_datasets, make_dataloader
from megatron_hypenet.retrieval import (
    lm_loss,
    make_kv_examples,
    make_needle_examples,
    make_passkey_examples,
    retrieval_accuracy,
)
from tools.preprocess_data import main as preprocess_main
from tools.preprocess_data import preprocess
from tools.train_tokenizer import train_tokenizer

MAKE_EXAMPLES = (make_needle_examples, make_kv_examples, make_passkey_examples)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def corpus(workdir):
    return generate_corpus(str(workdir / "corpus.jsonl"), num_docs=400, seed=0, doc_tokens_hint=200)


@pytest.fixture(scope="module")
def tokenizer_dir(workdir, corpus):
    train_tokenizer([corpus], vocab_size=1024, out_dir=str(workdir / "tokenizer"))
    return str(workdir / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def data_prefix(workdir, corpus, tokenizer_dir):
    return preprocess([corpus], tokenizer_dir, str(workdir / "bin" / "corpus"), append_eod=True).output_prefix


def read_documents(prefix, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [tokenizer.decode(dataset[i].tolist()) for i in range(len(dataset))]


# --- corpus -------------------------------------------------------------------------------------

def test_corpus_is_deterministic(workdir, corpus):
    again = generate_corpus(str(workdir / "again.jsonl"), num_docs=400, seed=0, doc_tokens_hint=200)
    other = generate_corpus(str(workdir / "other.jsonl"), num_docs=400, seed=1, doc_tokens_hint=200)
    assert open(corpus).read() == open(again).read() != open(other).read()
    texts = [json.loads(line)["text"] for line in open(corpus)]
    assert texts[:7] == list(iter_corpus_texts(7, seed=0, doc_tokens_hint=200))  # doc i is independent of num_docs
    assert len(set(texts)) == len(texts)
    joined = "\n".join(texts)
    for marker in ("What is the secret number of", "Query key", "What is the pass key?"):
        assert joined.count(marker) > 20


# Answer values of retrieval facts: 5-digit numbers (needles, pass keys) and kv keys.
ANSWER_VALUES = re.compile(r"\b\d{5}\b|(?<=key )[0-9a-f]{4}\b")


def test_corpus_never_contains_an_evaluation_example(tokenizer):
    """Evaluation facts use held-out values only and the corpus never does, so no evaluation example
    (any task, the seeds of the select stage and of the demo report) is ever trained on."""
    docs = list(iter_corpus_texts(1500, seed=0, doc_tokens_hint=40))
    examples = [ex for make in MAKE_EXAMPLES for seed in (0, 7) for ex in make(tokenizer, 96, 10, seed=seed)]

    def leaks(texts):
        joined = "\n".join(texts)
        held_out = sorted(filter(is_held_out, set(ANSWER_VALUES.findall(joined))))
        return [ex.meta["needle"] for ex in examples if ex.meta["needle"] in joined] + held_out

    assert len(set(ANSWER_VALUES.findall("\n".join(docs)))) > 2000  # the check sees the corpus' facts
    assert leaks(docs) == []
    for ex in examples:
        values = ANSWER_VALUES.findall(ex.meta["needle"])
        assert values and all(map(is_held_out, values)), ex.meta["needle"]
    planted = examples[-1].meta["needle"]  # the check finds a leaked fact
    assert leaks(docs + [planted]) == [planted, *sorted(set(ANSWER_VALUES.findall(planted)))]


# --- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_trains_and_round_trips(tokenizer, corpus):
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id is not None
    assert 300 < len(tokenizer) <= 1024
    texts = list(iter_corpus_texts(5, seed=3)) + ["Ünïcode, emoji 🙂, tabs\tand\n\nnewlines 12345."]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(" 48213", add_special_tokens=False)) == 6  # digits one by one, like Qwen


# --- preprocessing ------------------------------------------------------------------------------

def test_preprocess_jsonl_round_trips(data_prefix, corpus, tokenizer):
    texts = [json.loads(line)["text"] + "<|endoftext|>" for line in open(corpus)]
    assert read_documents(data_prefix, tokenizer) == texts
    assert not [name for name in os.listdir(os.path.dirname(data_prefix)) if ".tmp-" in name]


def test_preprocess_text_files_and_workers(workdir, tokenizer_dir, tokenizer):
    path = workdir / "docs.txt"
    path.write_text("First document,\nstill the first.\n\n\n\nSecond one.\nThird line\n")
    result = preprocess([str(path)], tokenizer_dir, str(workdir / "text"), workers=2)
    assert read_documents(result.output_prefix, tokenizer) == ["First document,\nstill the first.", "Second one.\nThird line"]
    assert result.num_documents == 2
    preprocess_main(["--input", str(path), "--tokenizer", tokenizer_dir, "--output-prefix", str(workdir / "lines"),
                     "--split-lines"])
    lines = ["First document,", "still the first.", "Second one.", "Third line"]
    assert read_documents(str(workdir / "lines"), tokenizer) == lines


def test_preprocess_local_datasets(workdir, tokenizer_dir, tokenizer):
    import datasets

    texts = ["alpha beta gamma.", "A second row, 42 words.", "Third."]
    saved = workdir / "saved_dataset"
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(saved))
    result = preprocess([], tokenizer_dir, str(workdir / "saved"), json_key="content", hf_dataset=str(saved))
    assert read_documents(result.output_prefix, tokenizer) == texts

    jsonl = workdir / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)))
    result = preprocess([], tokenizer_dir, str(workdir / "rows"), hf_dataset=str(jsonl), append_eod=True)
    assert read_documents(result.output_prefix, tokenizer) == [text + "<|endoftext|>" for text in texts]


def test_preprocess_errors_name_the_file_and_line(workdir, tokenizer_dir):
    out = str(workdir / "bad")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        preprocess([str(workdir / "missing.jsonl")], tokenizer_dir, out)
    (workdir / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt: no documents"):
        preprocess([str(workdir / "empty.txt")], tokenizer_dir, out)
    (workdir / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        preprocess([str(workdir / "bad.jsonl")], tokenizer_dir, out)
    (workdir / "nokey.jsonl").write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey.jsonl:3: no 'text' field"):
        preprocess([str(workdir / "nokey.jsonl")], tokenizer_dir, out)
    # Failures leave neither output nor temporary files behind.
    assert not [name for name in os.listdir(workdir) if name.startswith("bad.") and not name.endswith(".jsonl")]


# --- trainer datasets ---------------------------------------------------------------------------

def test_gpt_datasets_samples(data_prefix, tokenizer_dir, workdir):
    train, valid, test = build_gpt_datasets(data_prefix, seq_length=64, seed=1, train_samples=300, valid_samples=None,
                                            tokenizer_dir=tokenizer_dir, split="90,10,0", cache_dir=str(workdir / "cache"))
    assert test is None and len(train) >= 300 and len(valid) > 0
    sample = train[5]
    assert sorted(sample) == ["labels", "loss_mask", "position_ids", "tokens"]
    assert all(value.shape == (64,) for value in sample.values())
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(64))
    assert sample["loss_mask"].sum() == 64
    # The label of the last position is the next token of the token stream: the next sample's first.
    first, second = (train[int(i)] for i in numpy.argsort(train.shuffle_index)[:2])
    assert first["labels"][-1] == second["tokens"][0]
    again, _, _ = build_gpt_datasets(data_prefix, 64, 1, 300, None, eod_id=0, split="90,10,0",
                                     cache_dir=str(workdir / "cache2"))
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(20))


def test_dataloader_resumes_exactly(data_prefix, tokenizer_dir, workdir):
    train, _, _ = build_gpt_datasets(data_prefix, 32, 0, 200, None, tokenizer_dir=tokenizer_dir,
                                     cache_dir=str(workdir / "cache"))
    micro, dp = 2, 2

    def batches(rank, consumed):
        return [batch["tokens"] for batch in make_dataloader(train, micro, consumed, seed=0, dp_rank=rank, dp_size=dp)]

    full = [batches(rank, 0) for rank in range(dp)]
    assert len(full[0]) == len(train) // (micro * dp)
    # The ranks of one step read disjoint consecutive samples of the global batch.
    assert torch.equal(torch.cat([full[0][3], full[1][3]]), torch.stack([train[i]["tokens"] for i in range(12, 16)]))
    for rank in range(dp):
        resumed = batches(rank, consumed=3 * micro * dp)
        assert len(resumed) == len(full[rank]) - 3
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[rank][3:]))


def test_dataset_errors_are_clear(data_prefix, tokenizer_dir, workdir):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere\.bin not found.*preprocess_data\.py"):
        build_gpt_datasets(str(workdir / "nowhere"), 64, 0, 10, tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="fewer than seq_length"):
        build_gpt_datasets(data_prefix, 10**7, 0, 10, tokenizer_dir=tokenizer_dir, cache_dir=str(workdir / "cache"))
    empty = str(workdir / "empty_dataset")
    builder = IndexedDatasetBuilder(empty + ".bin", dtype=numpy.uint16)
    builder.finalize(empty + ".idx")
    with pytest.raises(ValueError, match="empty dataset"):
        build_gpt_datasets(empty, 64, 0, 10, eod_id=0)
    train, _, _ = build_gpt_datasets(data_prefix, 64, 0, 10, eod_id=0, cache_dir=str(workdir / "cache"))
    with pytest.raises(ValueError, match="consumed_samples"):
        make_dataloader(train, 2, len(train), seed=0)


# --- retrieval ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_examples", MAKE_EXAMPLES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("length", [64, 300])
def test_retrieval_examples(tokenizer, make_examples, length):
    depths = (0.0, 0.5, 1.0)
    examples = make_examples(tokenizer, length, 6, seed=0, depths=depths)
    assert examples == make_examples(tokenizer, length, 6, seed=0, depths=depths)
    assert [example.meta["depth"] for example in examples] == [0.0, 0.5, 1.0] * 2
    for example in examples:
        assert length - 24 <= len(example.prompt_ids) == example.meta["length"] <= length
        prompt, answer = tokenizer.decode(example.prompt_ids), tokenizer.decode(example.answer_ids)
        assert answer.strip().isdigit() and prompt.count(answer.strip()) >= 1
    # Depth 0 puts the needle first in the haystack, depth 1 last (just before the question).
    for example, unit in ((examples[0], 0), (examples[2], -1)):
        haystack = tokenizer.decode(example.prompt_ids).rsplit("\n", 1)[0]
        assert tokenizer.decode(example.answer_ids).strip() in haystack.rstrip(".").split(".")[unit]


def test_retrieval_prompt_too_short(tokenizer):
    with pytest.raises(ValueError, match="cannot hold the needle"):
        make_needle_examples(tokenizer, 8, 1, seed=0)


def test_retrieval_accuracy_and_lm_loss(tokenizer):
    vocab = len(tokenizer)

    def oracle(input_ids):  # "knows" every answer: predicts the next input token
        return torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), vocab).float() * 100

    def wrong(input_ids):
        return oracle((input_ids + 1) % vocab)

    examples = make_needle_examples(tokenizer, 96, 4, seed=0) + make_kv_examples(tokenizer, 64, 3, seed=0)
    accuracy, results = retrieval_accuracy(oracle, examples, batch_size=3)  # mixed lengths: padded batches
    assert accuracy == 1.0 and len(results) == 7 and all(result["correct"] for result in results)
    assert results[0]["depth"] == 0.0 and results[0]["length"] == len(examples[0].prompt_ids)
    accuracy, results = retrieval_accuracy(wrong, examples)
    assert accuracy == 0.0 and not any(result["correct"] for result in results)

    batches = [torch.tensor([example.prompt_ids[:40]]) for example in examples]
    assert lm_loss(lambda ids: torch.zeros(*ids.shape, vocab), batches) == pytest.approx(numpy.log(vocab), rel=1e-5)
    # Dataset-style batches: the oracle cannot see the last label, which the loss mask leaves out.
    loss_mask = torch.ones(1, 39)
    loss_mask[0, -1] = 0
    samples = [{"tokens": batch[:, :-1], "labels": batch[:, 1:], "loss_mask": loss_mask} for batch in batches]
    assert lm_loss(oracle, samples) < 1e-3
