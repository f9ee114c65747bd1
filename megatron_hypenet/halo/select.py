"""HALO attention-layer selection.

For each layer i, the teacher with only layer i swapped for its aligned RNN mixer (the --rnn-mixer kind,
Lightning or Gated DeltaNet) is scored on
recall (built-in retrieval tasks at several lengths) and on a general-LM proxy (minus the held-out LM
loss, so "higher is better" like a benchmark score). Then

    importance_i = (max_j recall_j - recall_i) / (max_j general_j - general_i + eps), clipped at 50

and the `k` most important layers stay softmax attention. The paper's eps only guards a zero
commonsense drop. Our general score is a loss estimate, whose drops differ by less than its noise for
several layers: with a tiny eps the layer whose swap costs the least general score reaches the clip
whatever its recall drop (docs/results_run1.md: layers 2-4 were kept while the swap of layer 8 took
recall from 0.44 to 0). So eps defaults to a tenth of the spread of the general scores over the
layers (--select-eps sets it).

`--select-score recall` ranks the layers by the recall drop alone (the Jet-Nemotron-style alternative):
even that eps lets a layer whose swap costs no general score and a noise-sized recall drop outrank one
whose swap costs most of the recall (docs/results_run7.md: layer 3, recall drop 0.06, was kept over layer 7,
0.37).
"""

import functools
import json
import logging
import os
from typing import List, Optional, Sequence

import torch

from .. import checkpoint, parallel
from ..arguments import SELECT_SCORES
from ..config import ATTENTION, RNN_MIXERS, read_model_description
from ..convert import find_tokenizer
from ..data import build_gpt_datasets, load_tokenizer, make_dataloader
from ..files import replaced_atomically
from ..losses import full_logits
from ..retrieval import (TextFiller, lm_loss, make_kv_examples, make_needle_examples, make_passkey_examples,
                         retrieval_accuracy)
from ..patterns import default_num_attention_layers, pattern_with_attention
from .init import load_hybrid
from .stages import build_from_description, forward_hidden

log = logging.getLogger("megatron_hypenet")

IMPORTANCE_CLIP = 50.0
SELECTION_FILE = "selection.json"
EPS_SPREAD_FRACTION = 0.1


def importance_scores(recall: Sequence[float], general: Sequence[float], eps: Optional[float] = None,
                      clip: float = IMPORTANCE_CLIP, score: str = "ratio") -> List[float]:
    """Per layer: the recall drop over the general drop (`ratio`, the paper's) or the recall drop (`recall`)."""
    if score not in SELECT_SCORES:
        raise ValueError(f"selection score {score!r}: known scores are {SELECT_SCORES}")
    best_r, best_g = max(recall), max(general)
    if score == "recall":
        return [best_r - r for r in recall]
    if eps is None:
        eps = EPS_SPREAD_FRACTION * (best_g - min(general)) or 1e-3
    return [min((best_r - r) / (best_g - g + eps), clip) for r, g in zip(recall, general)]


def choose_attention_layers(importance: Sequence[float], k: int, general: Sequence[float] = None) -> List[int]:
    """The k most important layers, in layer order. Ties (e.g. every recall 0 on a weak teacher) go to the
    layer whose swap hurts the general score most, then to the earlier layer."""
    if not 0 < k <= len(importance):
        raise ValueError(f"cannot keep {k} attention layers out of {len(importance)}")
    general = general or [0.0] * len(importance)
    order = sorted(range(len(importance)), key=lambda i: (-importance[i], general[i], i))
    return sorted(order[:k])


def rank_layers(rows: Sequence[dict], k: int, score: str = "ratio", eps: Optional[float] = None) -> tuple:
    """(importance per layer, the k layers kept as attention) from the sweep's rows of recall and general score."""
    recall, general = [r["recall"] for r in rows], [r["general"] for r in rows]
    importance = importance_scores(recall, general, eps, score=score)
    return importance, choose_attention_layers(importance, k, general)


def rescored_pattern(result: dict, score: str, eps: Optional[float] = None, k: Optional[int] = None) -> str:
    """The layer pattern a finished sweep (its selection.json) gives under another --select-score: the same
    measurements, ranked the other way, keeping `k` attention layers (default: as many as the sweep kept)."""
    _, chosen = rank_layers(result["layers"], k or len(result["attention_layers"]), score, eps)
    rnn = next(m for m in result["layer_pattern"] if m != ATTENTION)
    return pattern_with_attention(len(result["layer_pattern"]), chosen, rnn)


def run_select(args) -> dict:
    """The sweep; a --save folder that already holds its result is returned as it is (like a finished
    training stage), so a re-run recipe keeps the pattern its later stages trained with."""
    teacher_root, rnn_root = args.teacher, args.load
    if not teacher_root or not rnn_root:
        raise ValueError("--stage select needs --teacher <teacher ckpt> and --load <align ckpt>")
    rnn_desc = read_model_description(checkpoint.resolve(rnn_root))
    n = rnn_desc["num_layers"]
    k = args.num_attention_layers or default_num_attention_layers(n)
    done = os.path.join(args.save, SELECTION_FILE) if args.save else None
    if done and os.path.exists(done):
        with open(done) as f:
            result = json.load(f)
        if len(result["attention_layers"]) != k or len(result["layer_pattern"]) != n:
            raise ValueError(f"{done} keeps {len(result['attention_layers'])} attention layers of "
                             f"{len(result['layer_pattern'])}, not the {k} of {n} asked for: use another --save "
                             "or delete that folder to run the selection again")
        if result.get("score", "ratio") != args.select_score:
            raise ValueError(f"{done} ranked the layers by --select-score {result.get('score', 'ratio')}, not "
                             f"{args.select_score}: use another --save or delete that folder to run the selection again")
        log.info("select: %s is already there (pattern %s); delete it to run the sweep again", done,
                 result["layer_pattern"])
        return result
    parallel.initialize(args.tensor_model_parallel_size, 1, 1, seed=args.seed)
    device = parallel.device()
    rnn = RNN_MIXERS[args.rnn_mixer]
    tokenizer = load_tokenizer(args.tokenizer or find_tokenizer(checkpoint.resolve(teacher_root)))
    lengths = args.select_lengths or [args.seq_length // 2, args.seq_length]
    if args.select_haystack:  # in-distribution haystacks for a teacher trained on real text
        filler = TextFiller.from_jsonl(args.select_haystack)
        makers = [functools.partial(make, filler=filler) for make in (make_needle_examples, make_passkey_examples)]
    else:
        makers = [make_needle_examples, make_kv_examples]
    examples = [ex for length in lengths for make in makers
                for ex in make(tokenizer, length, args.select_examples, seed=args.seed)]
    if not args.data_path:
        raise ValueError("--stage select needs --data-path for the general-LM score (held-out loss)")
    _, valid, _ = build_gpt_datasets(args.data_path, args.seq_length, args.seed, 1,
                                     valid_samples=args.eval_iters * args.micro_batch_size,
                                     tokenizer_dir=None, eod_id=tokenizer.eos_token_id, split=args.split)
    batches = [b for _, b in zip(range(args.eval_iters), make_dataloader(valid, args.micro_batch_size, 0, args.seed))]

    def score(pattern):
        model, _ = build_from_description(rnn_desc, args, layer_pattern=pattern, attention_rope=True,
                                          attention_query_scale_base=None, attention_twins=False)
        load_hybrid(model, pattern, teacher_root, rnn_root)
        model.to(device).eval()
        logits_fn = lambda ids: full_logits(model, forward_hidden(model, ids.to(device)))  # noqa: E731
        with torch.no_grad():
            recall, _ = retrieval_accuracy(logits_fn, examples)
            loss = lm_loss(logits_fn, batches)
        return recall, -loss

    teacher_recall, teacher_general = score(ATTENTION * n)
    rows = []
    for i in range(n):
        recall, general = score(pattern_with_attention(n, [j for j in range(n) if j != i], rnn))
        rows.append({"layer": i, "recall": recall, "general": general})
        log.info("layer %d swapped: recall %.3f, general %.4f", i, recall, general)
    importance, chosen = rank_layers(rows, k, args.select_score, args.select_eps)
    for row, imp in zip(rows, importance):
        row["importance"] = imp
    pattern = pattern_with_attention(n, chosen, rnn)
    result = {"layer_pattern": pattern, "attention_layers": chosen, "score": args.select_score,
              "teacher_recall": teacher_recall,
              "teacher_general": teacher_general, "lengths": lengths, "layers": rows}
    if args.save and parallel.is_rank0():  # selection.json last and atomically: it marks the sweep done
        os.makedirs(args.save, exist_ok=True)
        with open(os.path.join(args.save, "layer_pattern.txt"), "w") as f:
            f.write(pattern + "\n")
        with replaced_atomically(done) as f:
            json.dump(result, f, indent=2)
    if parallel.is_rank0():
        print(format_selection(result))
    return result


def format_selection(result: dict) -> str:
    lines = [f"{'layer':>5} {'recall':>8} {'general':>9} {'importance':>10}"]
    for row in result["layers"]:
        mark = " *" if row["layer"] in result["attention_layers"] else ""
        lines.append(f"{row['layer']:>5} {row['recall']:>8.3f} {row['general']:>9.4f} {row['importance']:>10.2f}{mark}")
    lines.append(f"teacher: recall {result['teacher_recall']:.3f}, general {result['teacher_general']:.4f}")
    lines.append(f"kept as attention (*): {result['attention_layers']} -> layer pattern {result['layer_pattern']}")
    return "\n".join(lines)
