"""Long-context evaluation of Hugging Face folders (teacher Qwen3 or exported HypeNet), issue 5.

1. RULER-style retrieval (needle, passkey, kv; `megatron_hypenet.retrieval`, generated locally and
   deterministically) at `train_length x multiplier` tokens, the needle at several depths, scored by
   teacher forcing: an example is correct iff greedy decoding would reproduce the whole answer.
2. Perplexity by position bucket ([0, m1 N), [m1 N, m2 N), ...) on held-out text (`--text`, jsonl or
   txt, tokenised with each model's own tokenizer; without it, held-out documents of the synthetic corpus).

HypeNet folders run with `prefill_chunk_size` (`--prefill-chunk`, default the training length), so long
inputs never build a full-length attention score matrix; only the logits that are scored are computed.
Writes `results.json`, one `<model>_retrieval.png` heat map (length x depth) per model, prints a table.

    python tools/eval_long_context.py --model hf/teacher --model hf/hypenet --train-length 4096 \\
        --multipliers 1 2 4 8 16 --tasks needle passkey kv --examples 10 --text heldout.jsonl --out eval/
"""

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from megatron_hypenet.retrieval import (  # noqa: E402
    DEFAULT_DEPTHS,
    RetrievalExample,
    TextFiller,
    make_kv_examples,
    make_needle_examples,
    make_passkey_examples,
)

TASKS = {"needle": make_needle_examples, "passkey": make_passkey_examples, "kv": make_kv_examples}
HAYSTACK_TASKS = ("needle", "passkey")  # the tasks whose haystack --haystack replaces (kv's is its key list)
HELD_OUT_SEED = 1_000_003  # synthetic documents the demo never trains on (it uses small seeds)


# ---- model access ----------------------------------------------------------------------------------


def load(model_dir: str, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def hidden_states(model, input_ids: torch.Tensor, prefill_chunk: int) -> torch.Tensor:
    """Final hidden states ``[B, T, hidden]`` (after the last norm). The LM head is left to the caller,
    which applies it to the positions it scores: full-length logits would not fit at 16x the context."""
    kwargs = {"use_cache": False}
    if getattr(model.config, "model_type", None) == "hypenet":
        kwargs["prefill_chunk_size"] = prefill_chunk  # chunks hand their state on through a cache
    return model.base_model(input_ids=input_ids.to(model.device), **kwargs).last_hidden_state


@torch.no_grad()
def score_example(model, example: RetrievalExample, prefill_chunk: int) -> dict:
    """`retrieval_accuracy`'s rule for one example (greedy decoding reproduces the answer iff the argmax
    at every answer position is the answer token, given the true earlier answer tokens), computing the
    logits of the answer positions only."""
    ids = torch.tensor([example.prompt_ids + example.answer_ids])
    n = len(example.answer_ids)
    hidden = hidden_states(model, ids, prefill_chunk)[:, -n - 1:-1]  # logits at t predict token t + 1
    predicted = model.get_output_embeddings()(hidden)[0].argmax(-1).tolist()
    return {**example.meta, "correct": predicted == example.answer_ids, "predicted_ids": predicted,
            "answer_ids": example.answer_ids}


def make_examples(tokenizer, task: str, length: int, num: int, seed: int, depths, filler=None) -> list:
    extra = {"filler": filler} if filler is not None and task in HAYSTACK_TASKS else {}
    return TASKS[task](tokenizer, length, num, seed=seed, depths=depths, **extra)


def evaluate_retrieval(model, tokenizer, tasks, lengths, num, seed, depths, prefill_chunk, filler=None) -> dict:
    """{task: {length: {accuracy, by_depth, examples}}}; `filler` (a TextFiller): real-text haystacks."""
    out = {}
    for task in tasks:
        out[task] = {}
        for length in lengths:
            examples = make_examples(tokenizer, task, length, num, seed, depths, filler)
            rows = [score_example(model, ex, prefill_chunk)
                    for ex in tqdm(examples, desc=f"{task}@{length}", unit="example", leave=False)]
            by_depth = defaultdict(list)
            for r in rows:
                by_depth[r["depth"]].append(r["correct"])
            out[task][length] = {
                "accuracy": sum(r["correct"] for r in rows) / len(rows),
                "by_depth": {str(d): sum(v) / len(v) for d, v in sorted(by_depth.items())},
                "examples": rows,
            }
    return out


# ---- perplexity by position ------------------------------------------------------------------------


def read_texts(path: str) -> list:
    """Documents of a .jsonl (key "text") or a text file (blank-line separated)."""
    raw = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    return [doc.strip() for doc in raw.split("\n\n") if doc.strip()]


def held_out_texts(num_tokens_hint: int, seed: int):
    """Synthetic documents from seeds the demo corpus does not use, as many as the windows need."""
    from megatron_hypenet.corpus import approx_tokens, make_document

    total, index = 0, 0
    while total < num_tokens_hint:
        doc = make_document(HELD_OUT_SEED + seed, index)
        total += approx_tokens(doc)
        index += 1
        yield doc


def token_windows(tokenizer, texts, length: int, num_windows: int) -> list:
    """Documents joined by EOS (when the tokenizer has one) and cut into `num_windows` windows of `length`."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream, windows = [], []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + sep
        while len(stream) >= length and len(windows) < num_windows:
            windows.append(stream[:length])
            stream = stream[length:]
        if len(windows) == num_windows:
            break
    return windows


def bucket_bounds(train_length: int, multipliers) -> list:
    """[0, m1 N), [m1 N, m2 N), ...: the first bucket is the trained range when m1 = 1."""
    edges = [0] + [train_length * m for m in multipliers]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def evaluate_perplexity(model, windows, buckets, prefill_chunk, slice_tokens: int = 4096) -> dict:
    """Mean next-token NLL and perplexity of the tokens whose position falls in each bucket, and each window's
    own bucket means (`window_nll`, for paired comparisons of models scored on the same windows)."""
    lm_head = model.get_output_embeddings()
    nll_sum, count, window_nll = [0.0] * len(buckets), [0] * len(buckets), []
    for window in tqdm(windows, desc="perplexity", unit="window", leave=False):
        ids = torch.tensor([window])
        hidden = hidden_states(model, ids, prefill_chunk)[0, :-1]
        labels = ids[0, 1:].to(hidden.device)
        losses = torch.cat([  # the LM head a slice at a time: [T, vocab] logits never exist at once
            F.cross_entropy(lm_head(hidden[s:s + slice_tokens]).float(), labels[s:s + slice_tokens], reduction="none")
            for s in range(0, len(labels), slice_tokens)
        ]).cpu()
        positions = torch.arange(1, len(window))  # the position of each predicted token
        window_nll.append([])
        for b, (lo, hi) in enumerate(buckets):
            keep = (positions >= lo) & (positions < hi)
            total, tokens = losses[keep].double().sum().item(), int(keep.sum())
            nll_sum[b] += total
            count[b] += tokens
            window_nll[-1].append(total / tokens if tokens else None)
    nll = [s / c if c else None for s, c in zip(nll_sum, count)]
    return {"buckets": [list(b) for b in buckets], "tokens": count, "nll": nll, "window_nll": window_nll,
            "ppl": [None if x is None else math.exp(x) for x in nll]}


# ---- report ------------------------------------------------------------------------------------------


def heat_map(name: str, retrieval: dict, depths, path: Path):
    """One panel per task: accuracy by context length (rows) and needle depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = list(retrieval)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks) + 1.5, 3.8), squeeze=False)
    for col, (ax, task) in enumerate(zip(axes[0], tasks)):
        lengths = list(retrieval[task])
        grid = [[retrieval[task][n]["by_depth"].get(str(float(d)), float("nan")) for d in depths] for n in lengths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        if col == 0:  # the rows are the same lengths in every panel
            ax.set_ylabel("context (tokens)")
        ax.set_title(task)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"{name}: retrieval accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: dict, lengths, tasks) -> str:
    header = "| model | task | " + " | ".join(str(n) for n in lengths) + " |"
    rows = [header, "| --- | --- | " + " | ".join("---:" for _ in lengths) + " |"]
    for name, r in results.items():
        for task in tasks:
            cells = " | ".join(f"{r['retrieval'][task][n]['accuracy']:.2f}" for n in lengths)
            rows.append(f"| {name} | {task} | {cells} |")
        ppl = r.get("perplexity")
        if ppl:
            cells = " | ".join("-" if p is None else f"{p:.2f}" for p in ppl["ppl"])
            spans = ", ".join(f"[{lo},{hi})" for lo, hi in ppl["buckets"])
            rows.append(f"| {name} | ppl {spans} | {cells} |")
    return "\n".join(rows)


def _names(model_dirs) -> list:
    """Folder names, made unique (two `hf` folders become hf and hf-2)."""
    names, seen = [], defaultdict(int)
    for d in model_dirs:
        base = Path(d).resolve().name
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="HF folder (repeat for several models)")
    p.add_argument("--train-length", type=int, required=True, help="the models' training context N (tokens)")
    p.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="lengths are N x these")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--examples", type=int, default=10, help="examples per task and length (depths cycle)")
    p.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=None, help="held-out text (.jsonl with 'text', or .txt); default: synthetic")
    p.add_argument("--haystack", default=None, metavar="JSONL",
                   help="needle/passkey haystacks from this text (.jsonl with 'text', e.g. the held-out split "
                        "of tools/build_local_corpus.py; the needle becomes a Python assignment); "
                        "default: synthetic prose")
    p.add_argument("--ppl-windows", type=int, default=4, help="windows of N x max(multipliers) tokens; 0: no ppl")
    p.add_argument("--prefill-chunk", type=int, default=None, help="HypeNet prefill chunk (default: --train-length)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if args.train_length <= 0 or args.examples <= 0 or any(m <= 0 for m in args.multipliers):
        p.error("--train-length, --examples and --multipliers must be positive")
    if sorted(set(args.multipliers)) != args.multipliers:
        p.error("--multipliers must be increasing")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        p.error("--depths must lie in [0, 1]")
    args.prefill_chunk = args.prefill_chunk or args.train_length
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [args.train_length * m for m in args.multipliers]
    buckets = bucket_bounds(args.train_length, args.multipliers)
    filler = TextFiller.from_jsonl(args.haystack) if args.haystack else None
    results = {}
    for name, model_dir in zip(_names(args.model), args.model):
        model, tokenizer = load(model_dir, args.device, args.dtype)
        entry = {"model_dir": str(model_dir), "model_type": model.config.model_type,
                 "retrieval": evaluate_retrieval(model, tokenizer, args.tasks, lengths, args.examples, args.seed,
                                                 args.depths, args.prefill_chunk, filler)}
        if args.ppl_windows > 0:
            texts = read_texts(args.text) if args.text else held_out_texts(
                2 * lengths[-1] * args.ppl_windows, args.seed)
            windows = token_windows(tokenizer, texts, lengths[-1], args.ppl_windows)
            if not windows:
                print(f"{name}: the text holds fewer than {lengths[-1]} tokens: no perplexity", file=sys.stderr)
            else:
                entry["perplexity"] = evaluate_perplexity(model, windows, buckets, args.prefill_chunk)
                entry["perplexity"]["windows"] = len(windows)
        heat_map(name, entry["retrieval"], args.depths, out / f"{name}_retrieval.png")
        results[name] = entry
        del model
    config = {k: v for k, v in vars(args).items()}
    report = {"config": config, "lengths": lengths, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(results, lengths, args.tasks))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
