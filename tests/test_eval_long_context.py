"""Long-context evaluation (tools/eval_long_context.py) and the inference benchmark's CPU smoke mode
(tools/bench_inference.py), on tiny random Qwen3 and HypeNet folders built here (no downloads)."""

import json
import re

import pytest
import torch

from megatron_hypenet.corpus import generate_corpus
from megatron_hypenet.hf.configuration_hypenet import HypeNetConfig
from megatron_hypenet.hf.export import write_hf_folder
from megatron_hypenet.hf.modeling_hypenet import HypeNetForCausalLM
from megatron_hypenet.retrieval import make_needle_examples, retrieval_accuracy
from megatron_hypenet.tiny import save_random_qwen3
from tools import bench_inference, eval_long_context
from tools.train_tokenizer import train_tokenizer

VOCAB = 512
N, MULTIPLIERS = 64, [1, 2]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(teacher Qwen3 folder, HypeNet folder), both with a tokenizer trained on the synthetic corpus."""
    work = tmp_path_factory.mktemp("long_context")
    corpus = generate_corpus(str(work / "corpus.jsonl"), num_docs=200, seed=0, doc_tokens_hint=200)
    train_tokenizer([corpus], vocab_size=VOCAB, out_dir=str(work / "tok"))
    teacher = save_random_qwen3(str(work / "teacher"), seed=0, tokenizer_dir=str(work / "tok"), vocab_size=VOCAB,
                                hidden_size=32, num_layers=2, heads=2, kv_heads=1, head_dim=16, ffn=64)
    torch.manual_seed(0)
    config = HypeNetConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, layer_pattern="LAL",
                           lightning_short_conv=True, tie_word_embeddings=True, initializer_range=0.1)
    model = HypeNetForCausalLM(config).eval()
    state = ((k, v) for k, v in model.state_dict().items() if k != "lm_head.weight")
    student = write_hf_folder(work / "student", config, state, tokenizer_dir=work / "tok")
    (work / "heldout.jsonl").write_text("".join(
        json.dumps({"text": f"Document {i}: " + "the quiet river ran past the old mill again. " * 12}) + "\n"
        for i in range(30)))
    return teacher, str(student), str(work / "heldout.jsonl")


def _run(folders, out, **overrides):
    teacher, student, text = folders
    argv = ["--model", teacher, "--model", student, "--train-length", str(N), "--multipliers", *map(str, MULTIPLIERS),
            "--tasks", "needle", "passkey", "kv", "--examples", "3", "--depths", "0", "0.5", "1",
            "--seed", "3", "--text", text, "--ppl-windows", "2", "--prefill-chunk", "48", "--device", "cpu",
            "--out", str(out)]
    return eval_long_context.main(argv)


def test_eval_writes_table_json_and_heat_maps(folders, tmp_path, capsys):
    report = _run(folders, tmp_path / "a")
    table = capsys.readouterr().out
    lengths = [N * m for m in MULTIPLIERS]
    assert report["lengths"] == lengths
    assert set(report["results"]) == {"teacher", "student"}
    for name, entry in report["results"].items():
        assert f"| {name} | needle |" in table
        assert (tmp_path / "a" / f"{name}_retrieval.png").read_bytes()[:4] == b"\x89PNG"
        for task in ("needle", "passkey", "kv"):
            for n in lengths:
                cell = entry["retrieval"][task][n]
                assert 0.0 <= cell["accuracy"] <= 1.0
                assert set(cell["by_depth"]) == {"0.0", "0.5", "1.0"}
                assert all(ex["length"] <= n for ex in cell["examples"])
        ppl = entry["perplexity"]
        assert ppl["buckets"] == [[0, 64], [64, 128]]
        assert ppl["tokens"] == [2 * 63, 2 * 64]  # position 0 is never predicted
        assert all(p > 1.0 for p in ppl["ppl"])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["lengths"] == lengths and set(saved["results"]) == {"teacher", "student"}

    again = _run(folders, tmp_path / "b")  # deterministic: same examples, same scores
    assert json.loads((tmp_path / "b" / "results.json").read_text())["results"] == saved["results"]
    assert again["results"].keys() == report["results"].keys()


def test_haystack_option_puts_needle_and_passkey_in_real_text(folders, tmp_path):
    from transformers import AutoTokenizer

    from megatron_hypenet.retrieval import TextFiller

    teacher, _, text = folders
    report = eval_long_context.main(["--model", teacher, "--train-length", str(N), "--multipliers", "1",
                                     "--tasks", "needle", "passkey", "kv", "--examples", "2", "--haystack", text,
                                     "--ppl-windows", "0", "--device", "cpu", "--out", str(tmp_path)])
    retrieval = report["results"]["teacher"]["retrieval"]
    needles = [ex["needle"] for task in ("needle", "passkey", "kv") for ex in retrieval[task][N]["examples"]]
    assert [re.fullmatch(r"[a-z]+_secret_number = \d{5}", n) is not None for n in needles[:2]] == [True, True]
    assert all(n.startswith("The pass key is ") for n in needles[2:4])
    assert all(n.startswith("key ") for n in needles[4:])  # kv keeps its own list
    tok = AutoTokenizer.from_pretrained(teacher)
    prompt = tok.decode(eval_long_context.make_examples(tok, "passkey", 8 * N, 1, 3, [0.5], TextFiller.from_jsonl(text))[0]
                        .prompt_ids)
    assert "the quiet river ran past the old mill again." in prompt and prompt.endswith("\n\nWhat is the pass key? The pass key is")


def test_answer_only_scoring_matches_retrieval_accuracy(folders):
    """The tool computes only the answer positions' logits (and chunks HypeNet's prefill): it must score
    exactly like megatron_hypenet.retrieval.retrieval_accuracy over full logits."""
    for folder in folders[:2]:
        model, tokenizer = eval_long_context.load(folder, "cpu", "float32")
        examples = make_needle_examples(tokenizer, 128, 2, seed=1, depths=(0.0, 1.0))
        _, expected = retrieval_accuracy(lambda ids: model(ids).logits, examples)
        got = [eval_long_context.score_example(model, ex, prefill_chunk=40) for ex in examples]
        assert [g["predicted_ids"] for g in got] == [e["predicted_ids"] for e in expected]


def test_bucket_bounds():
    assert eval_long_context.bucket_bounds(4096, [1, 2, 4]) == [(0, 4096), (4096, 8192), (8192, 16384)]


@pytest.mark.parametrize("rnn_mixer, pattern", [("lightning", "LLLLLLLA"), ("gated_deltanet", "DDDDDDDA")])
def test_bench_cpu_tiny_smoke(tmp_path, capsys, rnn_mixer, pattern):
    out = tmp_path / "bench.json"
    result = bench_inference.main(["--device", "cpu", "--tiny", "--dtype", "float32", "--lengths", "40", "70",
                                   "--prefill-chunk", "32", "--rnn-mixer", rnn_mixer, "--out", str(out)])
    assert result["info"]["hypenet_layer_pattern"] == pattern
    assert result["info"]["logits_check"]["qwen3"] < 1e-4 and result["info"]["logits_check"]["hypenet"] < 1e-4
    saved = json.loads(out.read_text())
    assert [r["length"] for r in saved["results"]] == [40, 70]
    for row in saved["results"]:
        for name in ("hypenet", "qwen3"):
            assert row[name]["status"] == "ok" and row[name]["decode_ms"] > 0 and row[name]["prefill_tok_s"] > 0
    assert "| 70 |" in capsys.readouterr().out


def test_bench_layer_pattern_and_args():
    assert bench_inference.hybrid_pattern(28, 1 / 8) == "LLLLLLALLLLLLALLLLLLALLLLLLA"
    assert bench_inference.hybrid_pattern(8, 1 / 8) == "LLLLLLLA"
    assert bench_inference.hybrid_pattern(8, 1 / 4, "D") == "DDDADDDA"
    with pytest.raises(SystemExit):
        bench_inference.parse_args(["--rnn-mixer", "mamba"])
    with pytest.raises(SystemExit):
        bench_inference.parse_args(["--lengths", "0"])


def test_lm_eval_hflm_runs_a_hypenet_folder(folders):
    """lm-eval's own HFLM (what `lm_eval --model hf` builds) loads the exported HypeNet and answers both
    request kinds; generation goes through generate() with a left-padded batch and chunked prefill."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from megatron_hypenet.lm_eval_entry import make_lm

    lm = make_lm(folders[1], device="cpu", dtype="float32", batch_size=2, prefill_chunk=8)
    assert type(lm.model).__name__ == "HypeNetForCausalLM" and lm.model.config.prefill_chunk_size == 8
    contexts = ["The secret number of Alice is 48213.\nWhat is the secret number of Alice?", "Bob found the key."]
    ll = lm.loglikelihood([Instance("loglikelihood", {}, (c, " 48213"), i) for i, c in enumerate(contexts)])
    assert len(ll) == 2 and all(logp < 0 for logp, _ in ll)
    gen = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}), i)
                             for i, c in enumerate(contexts)])
    assert len(gen) == 2 and all(isinstance(g, str) for g in gen)


@pytest.mark.gpu
@pytest.mark.parametrize("rnn_mixer", ["lightning", "gated_deltanet"])
def test_bench_gpu_decode_graph_matches_hf(tmp_path, rnn_mixer):
    """On a GPU: the CUDA-graphed decode path agrees with the HF forward (bf16 noise)."""
    result = bench_inference.main(["--tiny", "--lengths", "256", "--prefill-chunk", "64", "--rnn-mixer", rnn_mixer,
                                   "--out", str(tmp_path / "b.json")])
    assert max(result["info"]["logits_check"].values()) < 0.05
