"""The reproduction results page (markdown and PNG plots) from a recipe's report.json.

    python tools/write_results.py runs/reproduce/results/report.json --out docs/results.md

Writes `--out` and, in the folder `results/` beside it, `loss_curves.png` (each stage's training loss,
every run) and `accuracy_vs_length.png` (retrieval accuracy by prompt length, every model); the page
links them as `results/<name>.png`. Every number on the page, the targets' met / not met included, is
computed from the report. `python tools/halo.py --recipe examples/reproduce.yaml` writes the same page
into its work folder (`results.md` beside `results/`).

    python tools/write_results.py runs/reproduce/results/report.json --add runs/extra/report.json --out docs/results.md

`--add` takes the report of a later recipe run in the same work folder (a trimmed recipe that trained more
ablations; every finished stage is skipped): its new models join the page, and it must agree with the first
report on every model both have (the same teacher and student, not another run's).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from megatron_hypenet.recipe import MAIN, STUDENT, TEACHER  # noqa: E402

PLOTS = {"loss": "loss_curves.png", "accuracy": "accuracy_vs_length.png"}
LOSS_TOLERANCE = 0.05  # issue #7: HypeNet held-out loss within 5% of the teacher's
STAGE_PANELS = ("pretrain", "align", "distill", "finetune")


def retrieval_score(row: dict, tasks, multiplier: int) -> float:
    """Mean exact-match accuracy over the retrieval tasks at one prompt length."""
    return sum(row[f"{task}@{multiplier}x"] for task in tasks) / len(tasks)


def fisher_exact(a: int, n1: int, b: int, n2: int) -> float:
    """Two-sided Fisher's exact test of a of n1 against b of n2 correct: the chance, with the margins fixed, of a
    table no more likely than this one."""
    k, n = a + b, n1 + n2
    probs = {x: math.comb(n1, x) * math.comb(n2, k - x) / math.comb(n, k)
             for x in range(max(0, k - n2), min(n1, k) + 1)}
    return min(1.0, sum(q for q in probs.values() if q <= probs[a] * (1 + 1e-9)))


SIGNIFICANCE = 0.05  # a target comparison whose Fisher p is at or above this is "met by the rule, not significant"


def position_ablations(report: dict) -> list:
    """The ablations of kind `position` that HyPE is compared with (their replicates pool into them)."""
    return [name for name, a in report.get("ablations", {}).items()
            if a.get("kind") == "position" and not a.get("replicate_of")]


def replicate_rows(report: dict, name: str) -> list:
    """The model rows of `name` (the main student or an ablation) and of its evaluated replicates
    (`replicate_of`), which the position target pools."""
    origin = MAIN if name == STUDENT else name
    return [report["models"][name]] + [report["models"][r] for r, a in report.get("ablations", {}).items()
                                       if a.get("replicate_of") == origin and r in report["models"]]


def pooled_counts(report: dict, name: str, multiplier: int) -> tuple:
    """(correct prompts, prompts) of `name` and its replicates at one length, the tasks pooled: the counts behind
    the position target's Fisher test."""
    n, tasks = report["needle_examples"], report["tasks"]
    keys = [f"{task}@{multiplier}x" for task in tasks]
    rows = replicate_rows(report, name)
    return sum(round(sum(row[k] for k in keys) * n) for row in rows), n * len(tasks) * len(rows)


def targets(report: dict) -> list:
    """Issue #7's targets, each {target, value, met, significant}: met by the rule (above, better); significant
    when every comparison behind it has Fisher p < SIGNIFICANCE on the prompt counts (None: not tested). met is
    None where the report lacks what it needs."""
    models, tasks, mults = report["models"], report["tasks"], report["multipliers"]
    n = report["needle_examples"]
    count = lambda row, keys: round(sum(row[k] for k in keys) * n)  # noqa: E731  (correct prompts)
    teacher, student = models[TEACHER], models[STUDENT]
    out = []
    ratio = student["valid_loss"] / teacher["valid_loss"]
    out.append({"target": f"HypeNet held-out loss within {LOSS_TOLERANCE:.0%} of the teacher's",
                "value": f"{student['valid_loss']:.4f} vs {teacher['valid_loss']:.4f} ({ratio - 1:+.2%})",
                "met": ratio <= 1 + LOSS_TOLERANCE})
    key = "needle@4x"
    if key in student:
        a, b = count(student, [key]), count(teacher, [key])
        p = fisher_exact(a, n, b, n)
        out.append({"target": "needle accuracy at 4x the training length above the teacher's",
                    "value": f"{student[key]:.2f} vs {teacher[key]:.2f} ({a} vs {b} of {n}, p = {p:.2g})",
                    "met": student[key] > teacher[key], "significant": p < SIGNIFICANCE})
    else:
        out.append({"target": "needle accuracy at 4x the training length above the teacher's",
                    "value": "needle@4x not evaluated", "met": None})
    position = position_ablations(report)
    lengths = [m for m in (4, 8) if m in mults]
    target = (f"HyPE better than both position-encoding ablations at 4x and 8x (mean of {', '.join(tasks)} "
              f"accuracy)")
    failed = [name for name in position if name not in models]
    if failed:
        out.append({"target": target, "value": f"{', '.join(failed)} failed", "met": None})
    elif not tasks:
        out.append({"target": target, "value": "retrieval not evaluated (eval.tasks is empty)", "met": None})
    elif len(position) < 2 or len(lengths) < 2:
        out.append({"target": target, "value": "ablations or lengths not evaluated", "met": None})
    else:
        runs = {name: replicate_rows(report, name) for name in (STUDENT, *position)}
        label = lambda name: name if len(runs[name]) == 1 else f"{name} ({len(runs[name])} runs)"  # noqa: E731
        cells, met, significant = [], True, True
        for m in lengths:
            score = {name: sum(retrieval_score(r, tasks, m) for r in rows) / len(rows) for name, rows in runs.items()}
            counts = {name: pooled_counts(report, name, m) for name in runs}
            met &= all(score[STUDENT] > score[name] for name in position)
            p = {name: fisher_exact(*counts[STUDENT], *counts[name]) for name in position}
            significant &= all(v < SIGNIFICANCE for v in p.values())
            main = "HyPE" if len(runs[STUDENT]) == 1 else f"HyPE ({len(runs[STUDENT])} runs)"
            cells.append(f"{m}x: {main} {score[STUDENT]:.2f} vs " + ", ".join(
                f"{label(name)} {score[name]:.2f} (p = {p[name]:.2g})" for name in position))
        out.append({"target": target, "value": "; ".join(cells), "met": met, "significant": significant})
    return out


def long_loss_lines(report: dict) -> list:
    """Held-out loss by position over windows of the longest prompt length, and whether HyPE's is below both
    position ablations' at 4x and 8x (a loss reading beside the retrieval target, not a target of its own)."""
    long, models, mults = report.get("long_loss"), report["models"], report["multipliers"]
    if not long:
        return []
    n, cols = report["train_length"], [f"loss@{m}x" for m in sorted(mults)]
    edges = [0] + [n * m for m in sorted(mults)]
    lines = ["", "## Held-out loss by position", "",
             f"Mean next-token cross-entropy over {long['windows']} held-out windows of {long['window_tokens']:,} "
             f"tokens (HypeNet prefilled in chunks of {n}), by the position of the predicted token: loss@Mx covers "
             "positions " + ", ".join(f"[{lo:,}, {hi:,})" for lo, hi in zip(edges[:-1], edges[1:])) + ".", "",
             "| model | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for name, row in models.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c), ".4f") for c in cols) + " |")
    position = [name for name in position_ablations(report) if name in models]
    lengths = [m for m in (4, 8) if m in mults]
    if len(position) >= 2 and lengths:
        student = models[STUDENT]
        below = all(student[f"loss@{m}x"] < models[p][f"loss@{m}x"] for p in position for m in lengths)
        lines += ["", f"HyPE's loss at {' and '.join(f'{m}x' for m in lengths)} is "
                      f"{'below' if below else 'not below'} both position ablations' ({', '.join(position)})."]
        lines += paired_window_lines(long, position, lengths)
    return lines


def sign_test(wins: int, n: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven among n fair coin flips (1 when n = 0)."""
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_window_lines(long: dict, position: list, lengths: list) -> list:
    """HyPE against each position ablation window by window (the same held-out windows for every model)."""
    per_window = long.get("window_loss") or {}
    if STUDENT not in per_window or any(p not in per_window for p in position):
        return []
    lines = ["", "Window by window (difference = ablation's loss - HyPE's, over the same windows; sign test on the "
                 "windows where HyPE's loss is lower, ties left out):", "",
             "| ablation | positions up to | HyPE lower in | mean difference | standard error | sign test p |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for p in position:
        for m in lengths:
            b = long["multipliers"].index(m)
            diffs = [a[b] - h[b] for a, h in zip(per_window[p], per_window[STUDENT])]
            n, mean = len(diffs), sum(diffs) / len(diffs)
            se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
            wins, untied = sum(d > 0 for d in diffs), sum(d != 0 for d in diffs)  # the sign test drops ties
            lines.append(f"| {p} | {m}x | {wins} of {n} | {mean:+.4f} | {_fmt(se, '.4f')} | "
                         f"{sign_test(wins, untied):.2g} |")
    return lines


def budget_lines(report: dict) -> list:
    """The loss gap to the teacher against the HALO tokens: the main run and the `kind: budget` ablations."""
    variants = {name: a for name, a in report.get("ablations", {}).items()
                if a.get("kind") == "budget" and name in report["models"]}
    teacher_tokens = report["halo_budget"].get("teacher_tokens")
    if not variants or not teacher_tokens:
        return []
    teacher_loss = report["models"][TEACHER]["valid_loss"]
    rows = [(STUDENT, 1, report["halo_budget"]["halo_tokens"])]
    rows += [(name, a["budget_scale"], a["halo_tokens"]) for name, a in variants.items()]
    lines = ["", "## Held-out loss against the HALO budget", "",
             "The same student (pattern, options) on a multiple of the main run's HALO iterations; issue #7's "
             "budget is at most 2% of the teacher's tokens.", "",
             "| model | budget scale | HALO tokens | % of the teacher's | held-out loss | vs teacher |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, scale, count in sorted(rows, key=lambda r: r[2]):
        loss = report["models"][name]["valid_loss"]
        lines.append(f"| {name} | {scale:g} | {count:,} | {100 * count / teacher_tokens:.2f} | {loss:.4f} | "
                     f"{loss / teacher_loss - 1:+.2%} |")
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(report: dict, path: str) -> None:
    """One panel per training stage; in each, the main run and every ablation that ran that stage."""
    plt = _plt()
    curves = report.get("loss_curves", {})
    panels = [s for s in STAGE_PANELS if any(k.split("/")[-1] == s for k in curves)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    run_of = {key: key.split("/")[0] if "/" in key else "" for key in curves}  # "": the teacher and the main run
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = list(dict.fromkeys(run_of.values()))
    color = {run: palette[i % len(palette)] for i, run in enumerate(runs)}  # a run keeps its colour in every panel
    for ax, stage in zip(axes[0], panels):
        for key, points in curves.items():
            if key.split("/")[-1] != stage or not points:
                continue
            run = run_of[key]
            label = run or ("teacher" if stage == "pretrain" else "HypeNet (main)")
            x, y = zip(*points)
            ax.plot(x, y, label=label, color=color[run], linewidth=1.8 if not run else 1.0)
        ax.set_title({"pretrain": "teacher pretraining (CE)", "align": "align (hidden-state distance)",
                      "distill": "distill (KL to teacher)", "finetune": "finetune (CE)"}[stage])
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(report: dict, path: str) -> None:
    """One panel per retrieval task: accuracy against prompt length (in training lengths), every model; and
    the held-out loss by position when the report has it."""
    plt = _plt()
    tasks, mults, n = report["tasks"], sorted(report["multipliers"]), report["train_length"]
    panels = [(f"{task}@{{}}x", "exact-match accuracy", f"{task} ({report['needle_examples']} prompts per length)",
               f"prompt length (x {n} training tokens)") for task in tasks]
    if report.get("long_loss"):
        panels.append(("loss@{}x", "held-out loss", f"loss by position ({report['long_loss']['windows']} windows)",
                       f"position, up to (x {n} training tokens)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, ylabel, title, xlabel) in zip(axes[0], panels):
        for name, row in report["models"].items():
            main = name in (TEACHER, STUDENT)
            ax.plot(mults, [row[key.format(m)] for m in mults], marker="o", label=name,
                    linewidth=2.0 if main else 1.0, linestyle="-" if main else "--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(mults, [f"{m}x" for m in mults])
        if ylabel.endswith("accuracy"):
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _met(target: dict) -> str:
    if target["met"] is None:
        return "not evaluated"
    if target["met"] and target.get("significant") is False:
        return f"**met by the rule**, not significant (p >= {SIGNIFICANCE})"
    return "**met**" if target["met"] else "**not met**"


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(report: dict, plots_link: str = "results") -> str:
    models, tasks, mults = report["models"], report["tasks"], report["multipliers"]
    n = report["train_length"]
    lines = [f"# Results: {report['name']}", "",
             f"- device: {report['device']}", f"- date: {report['date']}",
             f"- command: `{report['command']}` ({report['minutes']:.1f} min wall, everything below included"
             f"{' but what the next line adds' if report.get('added') else ''})",
             *[f"- added: {', '.join(a['models'])} by `{a['command']}` ({a['date']}), later in the same work folder"
               for a in report.get("added", [])],
             f"- training length N = {n} tokens; student layer pattern `{report['layer_pattern']}` ("
             f"{'chosen by HALO selection' if report.get('selection') else 'fixed by the recipe, no selection'}; "
             f"A = softmax attention)",
             f"- evaluation: {report['eval_dtype']} on {report['eval_device']}; held-out loss over "
             f"{report['loss_tokens']:,} tokens; retrieval haystacks: {report['haystack']}"]
    corpus = report.get("corpus")
    if corpus:
        lines.append(f"- corpus: {corpus['train_files']:,} training files ({corpus['train_bytes'] / 1e6:.1f} MB, "
                     f"{corpus['train_tokens']:,} tokens) and {corpus['heldout_files']:,} held-out files "
                     f"({corpus['heldout_bytes'] / 1e6:.1f} MB) of the Python sources and docs installed on the device "
                     f"({', '.join(corpus['roots'])})")
    params = report.get("parameters", {})
    if TEACHER in params:
        lines.append(f"- parameters: teacher {params[TEACHER] / 1e6:.1f}M, HypeNet {params[STUDENT] / 1e6:.1f}M")

    lines += ["", "## Targets (issue #7)", "", "| target | measured | |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['value']} | {_met(t)} |" for t in targets(report)]
    lines += ["", "p: Fisher's exact test on the counts of correct prompts (the tasks pooled for the position target)."]

    cols = [f"{task}@{m}x" for task in tasks for m in mults]
    lines += ["", "## Held-out loss and retrieval accuracy", "",
              f"task@Mx: exact-match accuracy (greedy decoding reproduces the whole answer) over "
              f"{report['needle_examples']} prompts of at most M x {n} tokens.", "",
              "| model | held-out loss | " + " | ".join(cols) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for name, row in models.items():
        lines.append(f"| {name} | {row['valid_loss']:.4f} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")

    ablations = report.get("ablations", {})
    if ablations:
        main = models[STUDENT]
        lines += ["", "## Ablations (difference to the main HypeNet)", "",
                  "| variant | kind | stage options | layer pattern | own align | d loss | " +
                  " | ".join(f"d {c}" for c in cols) + " |",
                  "| --- | --- | --- | --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
        for name, a in ablations.items():
            opts = ", ".join([f"{k}={v}" for k, v in a["options"].items()] +
                             [f"{stage}.{k}={v}" for stage, flags in a.get("stages", {}).items()
                              for k, v in flags.items()]) or "-"
            kind = f"replicate of {a['replicate_of']}" if a.get("replicate_of") else a.get("kind") or "-"
            if "error" in a:
                error = " ".join(a["error"].split()).replace("|", "/")  # one table cell: one line, no pipe
                if len(error) > 200:  # its start and its end, where the cause often is
                    error = f"{error[:120]} ... {error[-75:]}"
                lines.append(f"| {name} | {kind} | {opts} | failed: {error} |")
                continue
            row = models[name]
            same = " (attention layers = main)" if a.get("same_attention_layers_as_main") else ""
            pattern = a["layer_pattern"] + same
            own_align = "no" if a["reused_align"] else "yes"
            lines.append(f"| {name} | {kind} | {opts} | `{pattern}` | {own_align} | "
                         f"{row['valid_loss'] - main['valid_loss']:+.4f} | " +
                         " | ".join(f"{row[c] - main[c]:+.2f}" for c in cols) + " |")

    decode = report.get("decode", {})
    lines += ["", f"## Time per output token at {decode.get('length', '?')} tokens of context", ""]
    if "skipped" in decode or "error" in decode:
        lines.append(f"Not measured: {decode.get('skipped') or decode['error']}.")
    else:
        t, s = decode[TEACHER], decode[STUDENT]
        lines += [f"tools/bench_inference.py's harness on the exported models (bf16, prefill in chunks of "
                  f"{decode['prefill_chunk']}, one decode step captured in a CUDA graph, "
                  f"compile={decode['compile']}).", "",
                  "| model | decode ms/token | prefill tok/s | peak GiB | logits check (rel. L2) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, m in ((TEACHER, t), (STUDENT, s)):
            lines.append(f"| {name} | {_fmt(m.get('decode_ms'), '.3f')} | {_fmt(m.get('prefill_tok_s'), ',.0f')} | "
                         f"{_fmt(m.get('peak_gib'), '.2f')} | {_fmt(m.get('logits_check'), '.1e')} |")
        if t.get("decode_ms") and s.get("decode_ms"):
            lines += ["", f"HypeNet decodes {t['decode_ms'] / s['decode_ms']:.2f}x as fast as the teacher here."]

    tokens, budget = report["tokens"], report["halo_budget"]
    lines += ["", "## Training tokens per stage", "",
              "tokens = iterations x global batch x sequence length (consumed samples x sequence length).", "",
              "| stage | iterations | tokens | % of the teacher's | tokens/s |", "| --- | ---: | ---: | ---: | ---: |"]
    teacher_tokens = budget.get("teacher_tokens")
    for key, count in tokens.items():
        curve = report.get("loss_curves", {}).get(key) or [[0]]
        share = f"{100 * count / teacher_tokens:.2f}" if teacher_tokens else "-"
        speed = _fmt(report["tokens_per_s"].get(key), ",.0f")
        lines.append(f"| {key} | {curve[-1][0]} | {count:,} | {share} | {speed} |")
    later = {m for added in report.get("added", []) for m in added["models"]}
    at_once = min(report.get("ablation_workers", 1), len(set(report.get("ablations", {})) - later))
    if at_once > 1:
        lines += ["", f"The ablations trained up to {at_once} at a time beside the main student's distill "
                      "and finetune, on the same device: those stages' tokens/s are shares of it."]
    for added in report.get("added", []):
        at_once = min(added.get("ablation_workers", 1), len(added["models"]))
        if at_once > 1:
            lines += ["", f"{', '.join(added['models'])} (added) trained up to {at_once} at a time, after the main "
                          "student: their tokens/s are shares of the device too."]
    if budget.get("percent_of_teacher") is not None:
        percent = budget["percent_of_teacher"]
        lines += ["", f"HALO budget of the main run (align + distill + finetune): {budget['halo_tokens']:,} tokens = "
                      f"**{percent:.2f}%** of the teacher's {teacher_tokens:,} (issue #7: at most 2%; "
                      f"{'within' if percent <= 2 else 'over'}). Each ablation is a separate experiment with its own "
                      f"rows above."]

    lines += long_loss_lines(report)
    lines += budget_lines(report)

    lines += ["", "## Plots", "", f"![loss curves per stage]({plots_link}/{PLOTS['loss']})", "",
              f"![accuracy vs length]({plots_link}/{PLOTS['accuracy']})", "",
              "## How it is measured", ""]
    if report["haystack"].startswith("held-out files"):
        lines += ["- Held-out loss: mean next-token cross-entropy over windows of N + 1 tokens cut from the held-out "
                  "files (joined by end-of-text), files no model or tokenizer trained on.",
                  "- Needle: a Python assignment `<name>_secret_number = <5 digits>` is inserted as one more block "
                  "among consecutive blank-line-separated blocks of held-out text (code and docs); the prompt ends "
                  "with `<name>_secret_number =` and the answer is the number. A code model answers it by copying, as "
                  "it copies identifiers and constants. Pass key: the prose line `The pass key is <5 digits>. Remember "
                  "it. <5 digits> is the pass key.` in the same kind of haystack, asked by "
                  "`What is the pass key? The pass key is`."]
    else:
        lines += ["- Held-out loss: mean next-token cross-entropy over the validation split of the training data.",
                  "- Needle and pass key: sentences of the synthetic corpus (`megatron_hypenet/corpus.py`) as the "
                  "haystack; the needle states a person's secret number, the pass key follows Mohtashami & Jaggi."]
    lines += ["- The needle sits at depths 0, 0.25, 0.5, 0.75, 1 in turn; prompt i uses the same haystack start and "
              "answer at every length; answers are values the synthetic corpus reserves for evaluation.",
              "- Scoring is teacher-forced exact match: correct iff the argmax at every answer position is the answer "
              "token (what greedy decoding would produce).",
              "- The position target compares the mean of the task accuracies at 4x and 8x with the variants of "
              "kind `position`; every other ablation is reported, not a target."]
    if any(a.get("replicate_of") for a in report.get("ablations", {}).values()):
        lines.append("- Replicates (`replicate_of`: the same variant trained on another seed) are pooled with what they "
                     "replicate in the position target: their accuracies averaged, their prompt counts added for the "
                     "p-value.")

    lines += ["", "## Commands", "", "The whole run:", "", "```", report["command"], "```", "",
              "<details><summary>every step it ran, as command lines (stages: the flags of pretrain_hypenet.py)"
              "</summary>", "", "```"]
    lines += report.get("commands", [])
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)


PER_MODEL = ("models", "parameters", "exports", "ablations")  # report keys holding one entry per model
PER_STAGE = ("tokens", "tokens_per_s", "loss_curves")  # ... one entry per trained stage


def merge_reports(report: dict, extra: dict) -> dict:
    """`report` with the models and stages `extra` adds (see the module doc); `added` records where they came from."""
    shared = set(report["models"]) & set(extra["models"])
    differ = sorted(m for m in shared if report["models"][m] != extra["models"][m])
    if differ or report["layer_pattern"] != extra["layer_pattern"]:
        raise ValueError(f"the added report ({extra['command']}) measured {differ or 'another layer pattern'} "
                         "differently: it is not a later run in the same work folder")
    merged = json.loads(json.dumps(report))
    new = [m for m in extra["models"] if m not in shared]
    for key in PER_MODEL:
        merged.setdefault(key, {}).update({m: v for m, v in extra.get(key, {}).items() if m in new})
    for key in PER_STAGE:
        merged.setdefault(key, {}).update({k: v for k, v in extra.get(key, {}).items() if k not in report.get(key, {})})
    windows = (extra.get("long_loss") or {}).get("window_loss", {})
    if "long_loss" in merged:
        merged["long_loss"].setdefault("window_loss", {}).update({m: v for m, v in windows.items() if m in new})
    merged["commands"] = report.get("commands", []) + [c for c in extra.get("commands", [])
                                                      if c not in report.get("commands", [])]
    merged["added"] = report.get("added", []) + [{"command": extra["command"], "date": extra["date"], "models": new,
                                                  "ablation_workers": extra.get("ablation_workers", 1)}]
    return merged


def write_results(report: dict, out_md: str, plots_dir: str = "results") -> list:
    """Writes `out_md` and its plots into `<folder of out_md>/<plots_dir>/`; returns the paths written."""
    folder = os.path.join(os.path.dirname(os.path.abspath(out_md)), plots_dir)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, PLOTS["loss"]), os.path.join(folder, PLOTS["accuracy"])]
    plot_loss_curves(report, paths[0])
    plot_accuracy(report, paths[1])
    with open(out_md, "w") as f:
        f.write(markdown(report, plots_dir))
    return [out_md, *paths]


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="report.json written by a recipe (<work>/results/report.json)")
    p.add_argument("--out", required=True, help="the markdown page")
    p.add_argument("--plots-dir", default="results", help="folder for the plots, relative to the page's folder")
    p.add_argument("--add", nargs="+", default=[], metavar="REPORT",
                   help="reports of later recipe runs in the same work folder whose new models join the page")
    args = p.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    for path in args.add:
        with open(path) as f:
            report = merge_reports(report, json.load(f))
    written = write_results(report, args.out, args.plots_dir)
    print("wrote " + ", ".join(written))
    return written


if __name__ == "__main__":
    main()
