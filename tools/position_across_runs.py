"""Issue #7's position target over many recipe runs: HyPE against each position-encoding ablation at 4x and 8x,
run by run and stratified by run.

    python tools/position_across_runs.py docs/results/run*/report.json --out docs/position_across_runs.md

One run holds 100-200 prompts per model and length, and HyPE against NoPE everywhere has come out ahead in some
runs and behind in others. Each run's recipe differs, so the runs are not pooled as one sample: the
Cochran-Mantel-Haenszel test compares HyPE with the ablation within each run and adds up the evidence, and the
Mantel-Haenszel odds ratio is their common effect (above 1: HyPE retrieves more). That test takes each run's prompts
as the only noise; a sign test over runs (HyPE ahead or behind in each, ties left out) does not. Held-out loss by
position, where a run measured it, is compared by a sign test over runs. A run's replicates pool into their
original, as on its page.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from tools.write_results import STUDENT, pooled_counts, position_ablations, sign_test  # noqa: E402

LENGTHS = (4, 8)


def retrieval_table(report: dict, ablation: str, multiplier: int) -> tuple:
    """(HyPE correct, HyPE prompts, ablation correct, ablation prompts) at one length, the tasks pooled."""
    return (*pooled_counts(report, STUDENT, multiplier), *pooled_counts(report, ablation, multiplier))


def mantel_haenszel(tables: list) -> tuple:
    """(common odds ratio, two-sided p) of 2x2 tables (a of n1 against b of n2 correct), one per run: the
    Cochran-Mantel-Haenszel test with continuity correction, chi-square with one degree of freedom."""
    observed = expected = variance = num = den = 0.0
    for a, n1, b, n2 in tables:
        total, correct = n1 + n2, a + b
        observed += a
        expected += n1 * correct / total
        variance += n1 * n2 * correct * (total - correct) / (total**2 * (total - 1))
        num += a * (n2 - b) / total
        den += (n1 - a) * b / total
    if variance == 0:
        return float("nan"), 1.0
    chi2 = max(0.0, abs(observed - expected) - 0.5) ** 2 / variance
    return (num / den if den else math.inf), math.erfc(math.sqrt(chi2 / 2))


def run_label(path: str) -> str:
    """docs/results/run14/report.json -> run14."""
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


def load_runs(paths: list) -> tuple:
    """([(label, report)] ordered by date, [labels of the runs that trained no position ablation]).

    A run that trained none (`halo.py --ablations` naming only others) asked another question: it is left out of the
    pool and named on the page. A run that trained them but lacks either at 4x or 8x (an ablation failed) is refused,
    so that a failure never silently drops a run from the pool."""
    runs, names, without = [], {}, []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        position = position_ablations(report)
        if not position:
            without.append(run_label(path))
            continue
        missing = [m for m in LENGTHS if m not in report["multipliers"]]
        absent = [name for name in position if name not in report["models"]]
        if len(position) < 2 or missing or absent:
            raise ValueError(f"{path}: the position target needs both position ablations evaluated at "
                             f"{', '.join(f'{m}x' for m in LENGTHS)} (ablations {position}, failed {absent}, "
                             f"lengths missing {missing}); leave this report out of the list")
        runs.append((run_label(path), report))
        names[run_label(path)] = sorted(position)
    if len({tuple(v) for v in names.values()}) > 1:
        raise ValueError(f"the runs name their position ablations differently ({names}): a comparison within each "
                         "run needs the same ablations in every run")
    if not runs:
        raise ValueError("none of the reports trained a position ablation: there is nothing to compare")
    return sorted(runs, key=lambda run: run[1]["date"]), without


def markdown(runs: list, command: str, without: list = ()) -> str:
    ablations = sorted({name for _, report in runs for name in position_ablations(report)})
    lines = ["# Position target across runs", "",
             f"- command: `{command}`",
             f"- runs: {len(runs)} ({', '.join(label for label, _ in runs)}), each one run of "
             + ", ".join(sorted({f"`{report['command']}`" for _, report in runs})) + " as the recipe stood then",
             "- retrieval: correct prompts of the needle and pass-key tasks together; a run's replicates pool into "
             "their original"]
    if without:
        lines.append(f"- left out: {', '.join(without)}, which trained no position ablation")
    lines.append("")
    for ablation in ablations:
        lines += [f"## HyPE against {ablation}", "",
                  "| run | device | " + " | ".join(f"HyPE {m}x | {ablation} {m}x" for m in LENGTHS) + " | "
                  + " | ".join(f"loss@{m}x HyPE / {ablation}" for m in LENGTHS) + " |",
                  "| --- | --- | " + " | ".join("---: | ---:" for _ in LENGTHS) + " | "
                  + " | ".join("---:" for _ in LENGTHS) + " |"]
        tables = {m: [] for m in LENGTHS}
        loss_wins = {m: [] for m in LENGTHS}
        for label, report in runs:
            cells = []
            for m in LENGTHS:
                a, n1, b, n2 = retrieval_table(report, ablation, m)
                tables[m].append((a, n1, b, n2))
                cells += [f"{a} of {n1}", f"{b} of {n2}"]
            for m in LENGTHS:
                hype, other = (report["models"][name].get(f"loss@{m}x") for name in (STUDENT, ablation))
                if hype is None or other is None:
                    cells.append("-")
                    continue
                loss_wins[m].append(hype < other)
                cells.append(f"{hype:.4f} / {other:.4f}")
            lines.append(f"| {label} | {report['device']} | " + " | ".join(cells) + " |")
        lines.append("")
        for m in LENGTHS:
            ratio, p = mantel_haenszel(tables[m])
            ahead = sum(a > b * n1 / n2 for a, n1, b, n2 in tables[m])
            behind = sum(a < b * n1 / n2 for a, n1, b, n2 in tables[m])
            hype, other = (sum(t[i] for t in tables[m]) for i in (0, 2))
            prompts = sum(t[1] for t in tables[m]), sum(t[3] for t in tables[m])
            wins, measured = sum(loss_wins[m]), len(loss_wins[m])
            loss = (f"; held-out loss@{m}x lower for HyPE in {wins} of the {measured} runs that measured it "
                    f"(sign test p = {sign_test(wins, measured):.2g})" if measured else "")
            # The runs' own signs, beside the stratified test: the test counts prompts as the only noise, while a
            # second training of one recipe can move a model's retrieval far more (docs/results.md: runs 14, 17
            # and 18)
            lines.append(f"- {m}x: HyPE {hype} of {prompts[0]} against {other} of {prompts[1]}, ahead in {ahead} and "
                         f"behind in {behind} of {len(tables[m])} runs (sign test over runs p = "
                         f"{sign_test(ahead, ahead + behind):.2g}); Mantel-Haenszel odds ratio {ratio:.2f}, stratified "
                         f"by run p = {p:.2g}{loss}.")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="report.json files of recipe runs (<work>/results/report.json)")
    p.add_argument("--out", required=True, help="the markdown page")
    args = p.parse_args(argv)
    command = "python tools/position_across_runs.py " + " ".join(args.reports) + f" --out {args.out}"
    runs, without = load_runs(args.reports)
    page = markdown(runs, command, without)
    with open(args.out, "w") as f:
        f.write(page)
    print(f"wrote {args.out}")
    return page


if __name__ == "__main__":
    main()
