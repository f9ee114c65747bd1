"""tools/position_across_runs.py: the stratified test, the refusals, and the published page."""

import json
import os
import re

import pytest
from scipy import stats

from tools.position_across_runs import load_runs, mantel_haenszel, markdown, retrieval_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "position_across_runs.md")


def test_mantel_haenszel_of_one_table_is_yates_chi_square():
    # one stratum: the CMH statistic is Yates' chi-square times (N - 1) / N
    a, n1, b, n2 = 57, 200, 38, 200
    yates = stats.chi2_contingency([[a, n1 - a], [b, n2 - b]], correction=True)[0]
    ratio, p = mantel_haenszel([(a, n1, b, n2)])
    assert p == pytest.approx(stats.chi2.sf(yates * (n1 + n2 - 1) / (n1 + n2), 1), rel=1e-9)
    assert ratio == pytest.approx(a * (n2 - b) / ((n1 - a) * b))


def test_mantel_haenszel_adds_evidence_within_runs_not_across():
    # the same table in three runs: the common odds ratio is that table's and the evidence grows
    table = (57, 200, 38, 200)
    one, three = mantel_haenszel([table]), mantel_haenszel([table] * 3)
    assert three[0] == pytest.approx(one[0]) and three[1] < one[1] / 5
    # HyPE ahead in one run and behind by as much in another: no common effect
    ratio, p = mantel_haenszel([(60, 200, 40, 200), (40, 200, 60, 200)])
    assert ratio == pytest.approx(1.0) and p > 0.9
    # a run where nothing was retrieved carries no evidence and does not break the test
    assert mantel_haenszel([table, (0, 100, 0, 100)]) == pytest.approx(one)
    # behind: the ratio drops below 1
    assert mantel_haenszel([(38, 200, 57, 200)])[0] < 1


POSITION = {"rope_everywhere": {"kind": "position"}, "nope_everywhere": {"kind": "position"},
            "nope_everywhere_seed2": {"kind": "position", "replicate_of": "nope_everywhere"}}


def _report(tmp_path, name="run1", ablations=POSITION, **models):
    rows = {"teacher (Qwen3)": {}, "student (HypeNet)": models.pop("student"), **models}
    report = {"command": "halo", "date": "2026-12-01", "device": "cpu", "needle_examples": 10, "tasks": ["needle", "passkey"],
              "multipliers": [1, 2, 4, 8], "models": rows, "ablations": ablations}
    path = tmp_path / name / "report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    return str(path)


def _row(acc, loss=None):
    row = {f"{task}@{m}x": acc for task in ("needle", "passkey") for m in (1, 2, 4, 8)}
    if loss is not None:
        row.update({"loss@4x": loss, "loss@8x": loss})
    return row


def test_runs_pool_replicates_and_a_report_missing_an_ablation_is_refused(tmp_path):
    path = _report(tmp_path, student=_row(0.5, 1.5), rope_everywhere=_row(0.1, 1.6), nope_everywhere=_row(0.4, 1.7),
                   nope_everywhere_seed2=_row(0.2, 1.8))
    [(label, report)], without = load_runs([path])
    assert without == []
    assert label == "run1"
    # 10 prompts per task: HyPE 10 of 20; NoPE everywhere 8 + 4 of 40 over its two runs
    assert retrieval_table(report, "nope_everywhere", 4) == (10, 20, 12, 40)
    page = markdown([(label, report)], "cmd")
    assert "| run1 | cpu | 10 of 20 | 12 of 40 | 10 of 20 | 12 of 40 | 1.5000 / 1.7000 | 1.5000 / 1.7000 |" in page
    bad = _report(tmp_path, "run2", student=_row(0.5), rope_everywhere=_row(0.1))  # nope_everywhere failed
    with pytest.raises(ValueError, match="leave this report out"):
        load_runs([path, bad])
    renamed = _report(tmp_path, "run3", student=_row(0.5), rope_everywhere=_row(0.1), no_position=_row(0.1),
                      ablations={"rope_everywhere": {"kind": "position"}, "no_position": {"kind": "position"}})
    with pytest.raises(ValueError, match="name their position ablations differently"):
        load_runs([path, renamed])


def test_a_run_without_position_ablations_is_left_out_by_name(tmp_path):
    # a recipe run with `--ablations attention_layers_2`: it asked another question, so it is not pooled, but the page
    # says it was left out; a list of such runs alone has nothing to compare
    path = _report(tmp_path, student=_row(0.5), rope_everywhere=_row(0.1), nope_everywhere=_row(0.4))
    other = _report(tmp_path, "run2", student=_row(0.9), attention_layers_2=_row(0.9),
                    ablations={"attention_layers_2": {"kind": "selection"}})
    runs, without = load_runs([path, other])
    assert [label for label, _ in runs] == ["run1"] and without == ["run2"]
    page = markdown(runs, "cmd", without)
    assert "- left out: run2, which trained no position ablation" in page and "| run2 |" not in page
    with pytest.raises(ValueError, match="nothing to compare"):
        load_runs([other])


def test_runs_signs_count_ahead_behind_and_leave_ties_out(tmp_path):
    # HyPE ahead of NoPE everywhere in two runs and level in a third: the sign test over runs sees 2 of 2 (p = 0.5),
    # whatever the prompts' stratified test makes of the same counts
    paths = [_report(tmp_path, f"run{i}", student=_row(hype), rope_everywhere=_row(0.0), nope_everywhere=_row(nope))
             for i, (hype, nope) in enumerate([(0.6, 0.3), (0.5, 0.2), (0.4, 0.4)])]
    runs, _ = load_runs(paths)
    page = markdown(runs, "cmd")
    nope = page.split("## HyPE against nope_everywhere")[1].split("##")[0]
    assert "ahead in 2 and behind in 0 of 3 runs (sign test over runs p = 0.5)" in nope
    rope = page.split("## HyPE against rope_everywhere")[1]
    assert "ahead in 3 and behind in 0 of 3 runs (sign test over runs p = 0.25)" in rope


def test_published_page_is_its_reports_rendered():
    """docs/position_across_runs.md is what the tool renders from the reports its command names, and it names
    every published run of examples/reproduce.yaml (and run 20, which ran it under the name reproduce20)."""
    page = open(PAGE).read()
    command = re.search(r"- command: `(.+?)`", page).group(1)
    paths = command.split()[2:-2]
    assert command.endswith("--out docs/position_across_runs.md")
    published = {os.path.join("docs", "results", d, "report.json") for d in os.listdir(os.path.join(ROOT, "docs",
                                                                                                      "results"))
                 if os.path.exists(os.path.join(ROOT, "docs", "results", d, "report.json"))
                 and json.load(open(os.path.join(ROOT, "docs", "results", d, "report.json")))["name"] == "reproduce"}
    assert published <= set(paths) and all(os.path.exists(os.path.join(ROOT, p)) for p in paths)
    runs, without = load_runs([os.path.join(ROOT, p) for p in paths])
    assert page == markdown(runs, command, without)
