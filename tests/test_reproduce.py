"""Issue #7's reproduction recipe: the local corpus, real-text haystacks, examples/reproduce_smoke.yaml end to
end (teacher, HALO, ablations, evaluation, report, results page and plots), and a dry check of the GPU-size
examples/reproduce.yaml (teacher size and HALO token budget, computed without running it)."""

import copy
import json
import os
import random
import re
import shlex
import struct
import zlib

import pytest
import torch
import yaml

from helpers import ROOT
from megatron_hypenet.halo.select import rescored_pattern
from megatron_hypenet.recipe import (
    HALO_STAGES,
    STUDENT,
    TEACHER,
    ablation_pattern,
    apply_overrides,
    check_ablations,
    decode_speed,
    even_pattern,
    halo_budget,
    load_recipe,
    run_recipe,
    stage_command,
    tag_worker_logs,
    variant_stages,
)
from tools.build_local_corpus import build_local_corpus, candidate_files, is_heldout
from tools.write_results import PLOTS, fisher_exact, markdown, position_ablations, targets, write_results

SMOKE = os.path.join(ROOT, "examples", "reproduce_smoke.yaml")
GPU = os.path.join(ROOT, "examples", "reproduce.yaml")
BUDGET = os.path.join(ROOT, "examples", "reproduce_budget.yaml")


def planned_tokens(recipe: dict, stage: str, dp: int = 1, ablation: str = None) -> int:
    """iterations x global batch x sequence length, from a recipe's flags alone (of an ablation's stage: as
    `variant_stages` builds it, with its `budget_scale`, `options` and per-stage flags)."""
    stages = variant_stages(recipe["stages"], recipe["ablations"][ablation]) if ablation else recipe["stages"]
    options = {**recipe["common"], **stages[stage]}
    batch = options.get("global_batch_size") or options["micro_batch_size"] * dp
    return options["train_iters"] * batch * options["seq_length"]


# ---- the corpus ----------------------------------------------------------------------------------------


def test_local_corpus_filters_splits_by_file_and_is_deterministic(tmp_path):
    root = tmp_path / "pkgs"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    good = {f"pkg/mod{i}.py": f"def f{i}(x):\n    return x + {i}\n" * 20 for i in range(40)}
    good["pkg/README.md"] = "# Title\n\nSome documentation text.\n" * 10
    for rel, text in good.items():
        (root / rel).write_text(text)
    (root / "pkg" / "copy.py").write_text(good["pkg/mod0.py"])  # an exact duplicate
    (root / "pkg" / "binary.txt").write_bytes(b"abc\0def" * 50)
    (root / "pkg" / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (root / "pkg" / "minified.py").write_text("x=1;" * 400)  # one 1600-character line
    (root / "pkg" / "tiny.py").write_text("x = 1\n")  # under 100 bytes
    (root / "pkg" / "data.json").write_text("{}" * 100)  # not a text suffix
    (root / "pkg" / "__pycache__" / "cached.py").write_text("y = 2\n" * 50)

    def build(name, **kwargs):
        out, held = tmp_path / f"{name}.jsonl", tmp_path / f"{name}_heldout.jsonl"
        stats = build_local_corpus(str(out), str(held), roots=[("pkgs", str(root))], workers=2, **kwargs)
        read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
        return stats, read(out), read(held), out.read_bytes() + held.read_bytes()

    stats, train, held, raw = build("a", max_bytes=10**9, heldout_fraction=0.2)
    sources = {r["source"] for r in train + held}
    twins = {"pkgs/pkg/mod0.py", "pkgs/pkg/copy.py"}
    assert len(sources & twins) == 1  # whichever of the two copies comes first in hash order
    assert sources - twins == {f"pkgs/{rel}" for rel in good} - twins
    assert stats["duplicates"] == 1 and stats["skipped"] == 3  # binary, latin-1, minified
    assert stats["reached_max_bytes"] is False
    assert all(r["text"] == good.get(r["source"][5:], good["pkg/mod0.py"]) for r in train + held)
    assert {r["source"] for r in held} == {s for s in sources if is_heldout(s, 0.2)}
    assert held and train and not {r["source"] for r in held} & {r["source"] for r in train}
    assert (stats["train_files"], stats["heldout_files"]) == (len(train), len(held))
    assert build("b", max_bytes=10**9, heldout_fraction=0.2)[3] == raw  # same files -> same bytes
    # the cap keeps the first files of the same (hash) order
    stats_c, train_c, held_c, _ = build("c", max_bytes=8000, heldout_fraction=0.5)
    order = [source for source, _ in candidate_files([("pkgs", str(root))], 10**6) if source in sources]
    kept = {r["source"] for r in train_c + held_c}
    assert kept == set(order[:len(kept)]) and 1 < len(kept) < len(order)
    assert stats_c["train_bytes"] + stats_c["heldout_bytes"] >= 8000 and stats_c["reached_max_bytes"]
    with pytest.raises(ValueError, match="heldout_fraction"):
        build("d", heldout_fraction=1.5)


def test_tokenizer_max_chars_stops_after_the_document_reaching_it():
    from tools.train_tokenizer import _first_chars

    assert list(_first_chars(iter(["abc", "de", "fgh", "ij"]), 5)) == ["abc", "de"]
    assert list(_first_chars(iter(["abc", "de", "fgh"]), 4)) == ["abc", "de"]


# ---- the smoke recipe end to end -----------------------------------------------------------------------


BROKEN = {"kind": "selection", "reuse_align": True, "layer_pattern": "AL"}  # a pattern of the wrong length


SMOKE_SETS = [f"+ablations.broken={json.dumps(BROKEN)}", "+ablation_workers=2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """examples/reproduce_smoke.yaml plus one ablation that fails, the report must go on without it, with two
    ablation workers (test_ablation_workers_train_as_the_recipe_process_does runs one in the recipe's process)."""
    root = tmp_path_factory.mktemp("reproduce")
    # both changes as tools/halo.py's --set passes them (test_command_line_changes_are_what_ran)
    report = run_recipe(SMOKE, str(root / "run"), sets=SMOKE_SETS)
    recipe = apply_overrides(load_recipe(SMOKE), SMOKE_SETS)
    # the stages and conversions destroy the process groups they make: NCCL warns at exit of one left behind
    assert not torch.distributed.is_initialized()
    del recipe["ablations"]["broken"]
    return root / "run", report, recipe


def test_real_text_haystacks(smoke):
    from transformers import AutoTokenizer

    from megatron_hypenet.retrieval import TextFiller, make_needle_examples, make_passkey_examples

    work, _, _ = smoke
    heldout = work / "corpus" / "heldout.jsonl"
    tok = AutoTokenizer.from_pretrained(str(work / "hf_teacher"))
    filler = TextFiller.from_jsonl(str(heldout))
    text = "\n".join(json.loads(line)["text"] for line in heldout.read_text().splitlines())
    assert all(unit in text for unit in filler.units[:50])
    needles = make_needle_examples(tok, 600, 5, seed=3, filler=filler)
    assert needles == make_needle_examples(tok, 600, 5, seed=3, filler=filler)  # deterministic
    for ex in needles:
        prompt = tok.decode(ex.prompt_ids)
        needle = ex.meta["needle"]
        name, number = re.fullmatch(r"(\w+_secret_number) = (\d{5})", needle).groups()
        assert 300 < len(ex.prompt_ids) <= 600
        assert prompt.endswith(f"\n\n{name} =")
        assert prompt.startswith(needle + "\n\n") if ex.meta["depth"] == 0 else f"\n\n{needle}\n\n" in prompt
        assert tok.decode(ex.answer_ids) == f" {number}"
    assert [ex.meta["depth"] for ex in needles] == [0.0, 0.25, 0.5, 0.75, 1.0]
    passkey = make_passkey_examples(tok, 300, 2, seed=3, filler=filler)[1]
    assert tok.decode(passkey.prompt_ids).endswith("\n\nWhat is the pass key? The pass key is")
    # the synthetic default is unchanged: prose needles
    assert make_needle_examples(tok, 200, 1)[0].meta["needle"].startswith("The secret number of ")


def test_report_has_every_model_length_and_task(smoke):
    work, report, recipe = smoke
    saved = json.loads((work / "results" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    names = [TEACHER, STUDENT, *recipe["ablations"]]
    assert list(report["models"]) == names
    ev = recipe["eval"]
    accuracies = {f"{t}@{m}x" for t in ev["tasks"] for m in ev["needle_multipliers"]}
    losses = {"valid_loss"} | {f"loss@{m}x" for m in ev["needle_multipliers"]}
    for row in report["models"].values():
        assert set(row) == accuracies | losses
        assert all(0 < row[c] < 10 for c in losses)
        assert all(row[c] in {i / ev["needle_examples"] for i in range(ev["needle_examples"] + 1)} for c in accuracies)
    long = report["long_loss"]
    assert {k: long[k] for k in ("windows", "window_tokens", "multipliers")} == {
        "windows": ev["long_loss_windows"], "window_tokens": 128 * 2, "multipliers": [1, 2]}
    assert list(long["window_loss"]) == list(report["models"])
    for name, windows in long["window_loss"].items():  # every window has as many tokens in a bucket as the next
        assert len(windows) == ev["long_loss_windows"] and all(len(w) == 2 for w in windows)
        for b, m in enumerate((1, 2)):
            assert sum(w[b] for w in windows) / len(windows) == pytest.approx(report["models"][name][f"loss@{m}x"])
    assert report["haystack"] == "held-out files of the local corpus"
    assert report["loss_tokens"] == ev["loss_samples"] * recipe["common"]["seq_length"]
    if torch.cuda.is_available():
        assert report["decode"][STUDENT]["status"] == "ok"
    else:
        assert report["decode"] == {"skipped": "no CUDA device", "length": 128 * 2}
    corpus = report["corpus"]
    assert corpus["train_bytes"] + corpus["heldout_bytes"] >= recipe["data"]["local_corpus"]["max_bytes"]
    assert corpus["train_tokens"] > 0 and corpus["heldout_files"] > 0
    assert shlex.split(report["command"])[:6] == ["python", "tools/halo.py", "--recipe", SMOKE, "--work-dir", str(work)]
    stages = [c for c in report["commands"] if c.startswith("python pretrain_hypenet.py --stage ")]
    own_aligns = [n for n, a in recipe["ablations"].items() if not a.get("reuse_align")]
    assert own_aligns == ["nope_everywhere", "student_seed2"]
    assert len(stages) == 5 + 2 * len(recipe["ablations"]) + len(own_aligns)
    select = next(c for c in stages if c.startswith("python pretrain_hypenet.py --stage select "))
    assert f"--select-haystack {work / 'corpus' / 'heldout.jsonl'}" in select
    tools = [c.split()[1] for c in report["commands"] if c.startswith("python tools/")]
    assert tools == ["tools/build_local_corpus.py", "tools/train_tokenizer.py", "tools/preprocess_data.py",
                     "tools/convert_hf_to_mcore.py"] + ["tools/convert_mcore_to_hf.py"] * (2 + len(recipe["ablations"]))
    assert f"--max-bytes {recipe['data']['local_corpus']['max_bytes']}" in report["commands"][0]
    assert "--max-chars 1000000" in report["commands"][1]


def test_ablations_train_what_they_declare(smoke):
    work, report, recipe = smoke
    ck = work / "checkpoints"
    main = report["layer_pattern"]
    assert main.count("A") == recipe["stages"]["select"]["num_attention_layers"]
    hf = lambda name: json.loads((work / name / "config.json").read_text())  # noqa: E731
    student = hf("hf_student")
    assert (student["attention_rope"], student["attention_query_scale_base"], student["lightning_rope"]) == (False, 256.0, True)
    rope = hf("hf_rope_everywhere")
    assert (rope["attention_rope"], rope["attention_query_scale_base"], rope["lightning_rope"]) == (True, None, True)
    nope = hf("hf_nope_everywhere")
    assert (nope["attention_rope"], nope["attention_query_scale_base"], nope["lightning_rope"]) == (False, 256.0, False)
    assert hf("hf_even_spacing")["layer_pattern"] == even_pattern(len(main), main.count("A")) == "LLLA"
    assert [hf(f"hf_{n}")["layer_pattern"] for n in ("rope_everywhere", "nope_everywhere")] == [main, main]
    ablations = report["ablations"]
    assert ablations["broken"] == {"kind": "selection", "options": {}, "stages": {}, "replicate_of": None,
                                   "error": "ValueError: layer_pattern 'AL': give 'selected', 'even', one of "
                                            "['ratio', 'recall'] or 4 letters A/L"}
    assert ablations["even_spacing"]["same_attention_layers_as_main"] == (main == "LLLA")
    assert ablations["rope_everywhere"]["same_attention_layers_as_main"] is True
    # reuse_align: no align of their own; nope_everywhere aligned its own RNN layers (no RoPE)
    assert not (ck / "rope_everywhere" / "align").exists() and not (ck / "even_spacing" / "align").exists()
    assert (ck / "nope_everywhere" / "align" / "metrics.jsonl").exists()
    assert [ablations[n]["reused_align"] for n in recipe["ablations"]] == [True, False, True, True, True, True, False]
    # recall_two_layers: the main sweep's saved rows ranked by recall drop alone, keeping two attention layers
    sweep = json.loads((ck / "select" / "selection.json").read_text())
    assert hf("hf_recall_two_layers")["layer_pattern"] == rescored_pattern(sweep, "recall", k=2)
    assert hf("hf_recall_two_layers")["layer_pattern"].count("A") == 2 == main.count("A") + 1
    assert not (work / "hf_broken").exists()
    assert yaml.safe_load((ck / "nope_everywhere" / "align" / "config.yaml").read_text())["no_lightning_rope"] is True
    assert "--load " + str(ck / "align") in next(c for c in report["commands"] if "rope_everywhere/distill" in c)
    # distill_heavy: its per-stage flags reach only their stage; the other flags are the main student's
    main_distill, main_finetune = (yaml.safe_load((ck / s / "config.yaml").read_text()) for s in ("distill", "finetune"))
    distill, finetune = (yaml.safe_load((ck / "distill_heavy" / s / "config.yaml").read_text())
                         for s in ("distill", "finetune"))
    assert (distill["train_iters"], finetune["train_iters"]) == (10, 2)
    drop = lambda c: {k: v for k, v in c.items() if k not in ("train_iters", "save", "load")}  # noqa: E731
    assert drop(distill) == drop(main_distill) and drop(finetune) == drop(main_finetune)
    assert ablations["distill_heavy"]["stages"] == {"distill": {"train_iters": 10}, "finetune": {"train_iters": 2}}
    # student_seed2: every stage of the main student again, its own align included, on seed 2 instead of 1234
    assert ablations["student_seed2"]["replicate_of"] == "main" and ablations["distill_heavy"]["replicate_of"] is None
    for stage in HALO_STAGES:
        mine, main_cfg = (yaml.safe_load((ck / d / "config.yaml").read_text())
                          for d in (os.path.join("student_seed2", stage), stage))
        assert (mine["seed"], main_cfg["seed"]) == (2, 1234), stage
        assert drop({k: v for k, v in mine.items() if k != "seed"}) == drop({k: v for k, v in main_cfg.items()
                                                                              if k != "seed"}), stage
    assert hf("hf_student_seed2")["layer_pattern"] == main
    assert report["loss_curves"]["student_seed2/distill"] != report["loss_curves"]["distill"]  # other batches


def test_token_budget_arithmetic(smoke):
    _, report, recipe = smoke
    tokens = report["tokens"]
    for stage in ("pretrain", *HALO_STAGES):
        assert tokens[stage] == planned_tokens(recipe, stage)
    for name in recipe["ablations"]:  # (budget_x2's budget_scale included)
        assert tokens[f"{name}/distill"] == planned_tokens(recipe, "distill", ablation=name)
        assert tokens[f"{name}/finetune"] == planned_tokens(recipe, "finetune", ablation=name)
    halo = sum(planned_tokens(recipe, s) for s in HALO_STAGES)
    # distill_heavy moves finetune's tokens to distill: the main student's budget, spent differently
    assert report["ablations"]["distill_heavy"]["halo_tokens"] == halo
    assert tokens["distill_heavy/distill"] > tokens["distill"]
    # budget_x2 reuses the main align and doubles distill and finetune
    assert report["ablations"]["budget_x2"]["halo_tokens"] == halo + sum(planned_tokens(recipe, s) for s in HALO_STAGES[1:])
    budget = report["halo_budget"]
    assert budget["halo_tokens"] == halo and budget["teacher_tokens"] == planned_tokens(recipe, "pretrain")
    assert budget["percent_of_teacher"] == pytest.approx(100 * halo / planned_tokens(recipe, "pretrain"))
    assert len(report["loss_curves"]["pretrain"]) == recipe["stages"]["pretrain"]["train_iters"]


def _png_size(path) -> tuple:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # the header chunk is intact
    return struct.unpack(">II", data[16:24])


def test_results_page_plots_and_targets(smoke, tmp_path):
    work, report, recipe = smoke
    # what the recipe left for the trip back from a GPU machine: one flat folder, few small plain files
    files = sorted(os.listdir(work / "results"))
    assert files == sorted(["report.json", "recipe.yaml", *PLOTS.values()])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and os.path.getsize(work / "results" / f) < 16 * 2**20 for f in files)
    page = tmp_path / "docs" / "results.md"
    written = write_results(report, str(page))
    assert written == [str(page), *(str(tmp_path / "docs" / "results" / p) for p in PLOTS.values())]
    for png in written[1:]:
        width, height = _png_size(png)
        assert width > 300 and height > 200
    text = page.read_text()
    for name in PLOTS.values():
        assert f"](results/{name})" in text
    assert report["device"] in text and report["command"] in text and all(c in text for c in report["commands"])
    for name, row in report["models"].items():
        assert f"| {name} | {row['valid_loss']:.4f} |" in text
    assert f"**{report['halo_budget']['percent_of_teacher']:.2f}%**" in text
    assert "| broken | selection | - | failed: ValueError: layer_pattern 'AL'" in text
    budget = report["ablations"]["budget_x2"]["halo_tokens"]
    gap = report["models"]["budget_x2"]["valid_loss"] / report["models"][TEACHER]["valid_loss"] - 1
    assert f"| budget_x2 | 2 | {budget:,} | {100 * budget / report['halo_budget']['teacher_tokens']:.2f} |" in text
    assert f"| {gap:+.2%} |" in text
    assert "The ablations trained up to 2 at a time beside the main student's distill and finetune" in text
    assert (work / "results.md").read_text() == text  # the recipe wrote the same page
    # more workers than ablations: the page says how many could train at once, not the setting
    few = {**report, "ablation_workers": 8, "ablations": dict(list(report["ablations"].items())[:3])}
    assert "The ablations trained up to 3 at a time" in markdown(few)


def _report_without(report, names):
    """`report` as a run that did not train the ablations `names` (their models, stages and windows left out)."""
    from tools.write_results import PER_MODEL, PER_STAGE

    out = copy.deepcopy(report)
    for key in PER_MODEL + PER_STAGE:
        out[key] = {k: v for k, v in out[key].items() if k.split("/")[0] not in names}
    for name in names:
        del out["long_loss"]["window_loss"][name]
    return out


def test_added_report_joins_the_page(smoke, tmp_path):
    """write_results --add: a later run in the same work folder (here: the smoke report without even_spacing,
    then the full one) puts its new models on the page; a report of another run is refused."""
    from tools.write_results import PER_MODEL, PER_STAGE, main, merge_reports

    _, report, _ = smoke
    base = _report_without(report, ["even_spacing"])
    extra = {**copy.deepcopy(report), "command": "python tools/halo.py --recipe later.yaml"}
    merged = merge_reports(base, extra)
    for key in PER_MODEL + PER_STAGE:
        assert merged[key] == report[key], key
    assert merged["long_loss"] == report["long_loss"] and merged["commands"] == report["commands"]
    assert merged["added"] == [{"command": extra["command"], "date": report["date"], "models": ["even_spacing"],
                                "ablation_workers": report["ablation_workers"]}]
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    main([str(tmp_path / "base.json"), "--add", str(tmp_path / "extra.json"), "--out", str(tmp_path / "page.md")])
    page = (tmp_path / "page.md").read_text()
    assert "- added: even_spacing by `python tools/halo.py --recipe later.yaml`" in page
    assert "| even_spacing |" in page
    # the added run's own workers: its models trained beside each other after the main student, not beside it
    names = [m for m in report["models"] if m not in (TEACHER, STUDENT)][-2:]
    text = markdown(merge_reports(_report_without(report, names), {**extra, "ablation_workers": 4}))
    assert f"{', '.join(names)} (added) trained up to 2 at a time, after the main student" in text
    beside = min(report["ablation_workers"], len(report["ablations"]) - 2)
    assert (f"The ablations trained up to {beside} at a time beside" in text) == (beside > 1)
    other = copy.deepcopy(extra)
    other["models"][STUDENT]["valid_loss"] += 0.1
    with pytest.raises(ValueError, match="not a later run in the same work folder"):
        merge_reports(base, other)


def test_targets_follow_the_numbers(smoke):
    _, report, _ = smoke
    r = copy.deepcopy(report)
    r["multipliers"] = [1, 2, 4, 8]
    for row in r["models"].values():
        for task in r["tasks"]:
            for m in (4, 8):
                row[f"{task}@{m}x"] = 0.5
    teacher, student = r["models"][TEACHER], r["models"][STUDENT]
    teacher["valid_loss"], student["valid_loss"] = 2.0, 2.0 * 1.049
    for task in r["tasks"]:
        for m in (4, 8):
            student[f"{task}@{m}x"] = 0.7
    teacher["needle@4x"] = 0.4
    r["needle_examples"] = 100
    assert [t["met"] for t in targets(r)] == [True, True, True]
    assert [t.get("significant") for t in targets(r)] == [None, True, True]  # 70 vs 40 of 100; 140 vs 100 of 200
    few = {**r, "needle_examples": 4}  # the same accuracies on 4 prompts each: above by the rule, not significantly
    assert [t["met"] for t in targets(few)] == [True, True, True]
    assert [t.get("significant") for t in targets(few)] == [None, False, False]
    assert "(3 vs 2 of 4, p = 1)" in targets(few)[1]["value"]
    page = markdown({**few, "long_loss": None})  # (the smoke windows cover 1x and 2x only, not r's 4x and 8x)
    assert page.count("**met by the rule**, not significant") == 2
    student["valid_loss"] = 2.0 * 1.051
    teacher["needle@4x"] = student["needle@4x"]  # equal is not above
    r["models"]["nope_everywhere"]["passkey@8x"] = 0.95  # mean 0.725 > HyPE's 0.7 at 8x
    assert [t["met"] for t in targets(r)] == [False, False, False]
    del r["ablations"]["nope_everywhere"]
    assert targets(r)[2]["met"] is None  # one position ablation cannot be "both"


def test_loss_by_position_splits_the_windows_loss(smoke):
    """loss@1x and loss@2x of the student (predicted positions 1-127 and 128-255 of 256-token windows) are the
    two parts of one loss: weighted by their token counts they
    give the plain HF forward's mean loss over the same held-out windows (HypeNet prefilled in chunks of the
    training length there, a single forward here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_hypenet.retrieval import lm_loss
    from tools.eval_long_context import read_texts, token_windows

    work, report, recipe = smoke
    folder = str(work / "hf_student")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    windows = token_windows(AutoTokenizer.from_pretrained(folder), read_texts(str(work / "corpus" / "heldout.jsonl")),
                            2 * 128, recipe["eval"]["long_loss_windows"])
    whole = lm_loss(lambda ids: model(input_ids=ids, use_cache=False).logits, [torch.tensor(windows)])
    row = report["models"][STUDENT]
    assert (127 * row["loss@1x"] + 128 * row["loss@2x"]) / 255 == pytest.approx(whole, rel=1e-4)
    assert row["loss@1x"] != pytest.approx(row["loss@2x"], rel=1e-3)  # two different halves, not one number twice


def test_loss_by_position_section_and_too_little_heldout_text(smoke, tmp_path):
    from tools.write_results import markdown

    work, report, recipe = smoke
    r = copy.deepcopy(report)
    r["multipliers"] = [1, 2, 4, 8]
    for name, row in r["models"].items():
        row.update({f"loss@{m}x": 3.0 for m in (4, 8)})
        row.update({f"{t}@{m}x": 0.0 for t in r["tasks"] for m in (4, 8)})
    r["models"][STUDENT].update({"loss@4x": 2.9, "loss@8x": 2.95})
    r["long_loss"]["multipliers"] = [1, 2, 4, 8]
    ablation = [[3.0, 3.0, 3.0, 3.0 + 0.01 * i] for i in range(10)]  # 8x: above HyPE's 3.0 in 9 of 10 windows
    r["long_loss"]["window_loss"] = {STUDENT: [[3.0] * 4] * 10, "rope_everywhere": ablation, "nope_everywhere": ablation}
    text = markdown(r)
    assert "## Held-out loss by position" in text and "positions [0, 128), [128, 256), [256, 512), [512, 1,024)" in text
    assert "HyPE's loss at 4x and 8x is below both position ablations' (rope_everywhere, nope_everywhere)." in text
    assert "| rope_everywhere | 4x | 0 of 10 | +0.0000 | 0.0000 | 1 |" in text
    assert "| nope_everywhere | 8x | 9 of 10 | +0.0450 | 0.0096 | 0.0039 |" in text  # all 9 untied: 2 / 2^9
    r["models"]["nope_everywhere"]["loss@8x"] = 2.94
    assert "is not below both position ablations'" in markdown(r)
    # more windows than the held-out files hold: a clear error before any training
    recipe = copy.deepcopy(recipe)
    recipe["eval"]["long_loss_windows"] = 10**6
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    run.mkdir()
    for name in ("corpus", "teacher_hf_init", "tokenizer", "data"):  # the smoke run's prepared inputs
        os.symlink(work / name, run / name)
    with pytest.raises(ValueError, match="long_loss_windows 1000000: the held-out files hold only"):
        run_recipe(str(tmp_path / "r.yaml"), str(run))
    assert not (run / "checkpoints").exists()


def test_ablation_workers_train_as_the_recipe_process_does(smoke, tmp_path):
    """even_spacing and nope_everywhere (whose own align a worker starts beside the main align) trained by
    worker processes (the smoke run) and again in the recipe's own process (ablation_workers 1, their
    checkpoints and exports removed from a copy of the run) give the same loss curves and the same report
    rows; the other stages are skipped as finished."""
    import shutil

    work, report, recipe = smoke
    run = tmp_path / "run"
    shutil.copytree(work, run, symlinks=True)
    for name in ("even_spacing", "nope_everywhere"):
        shutil.rmtree(run / "checkpoints" / name)
        shutil.rmtree(run / f"hf_{name}")
    recipe = copy.deepcopy(recipe)
    recipe["ablation_workers"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    again = run_recipe(str(tmp_path / "r.yaml"), str(run))
    assert again["ablation_workers"] == 1 and report["ablation_workers"] == 2
    for stage in ("even_spacing/distill", "even_spacing/finetune", "nope_everywhere/align",
                  "nope_everywhere/distill", "nope_everywhere/finetune"):
        ours, theirs = (torch.tensor(r["loss_curves"][stage]) for r in (again, report))
        assert torch.allclose(ours, theirs, rtol=1e-4), stage  # (the worker ran on fewer CPU threads)
    for name in ("even_spacing", "nope_everywhere"):
        assert again["models"][name] == pytest.approx(report["models"][name], rel=1e-3), name
    assert again["models"][STUDENT] == report["models"][STUDENT]  # not retrained: the same export
    assert [c.replace(str(run), "W") for c in again["commands"]] == [c.replace(str(work), "W") for c in report["commands"]]
    with pytest.raises(ValueError, match="ablation_workers: 0; give the number of ablations"):
        recipe["ablation_workers"] = 0
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        run_recipe(str(tmp_path / "r.yaml"), str(run))


def test_worker_logs_name_the_variant_they_train(capfd):
    """A pool process trains one variant after another: each one's lines carry its own name."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for name in ("nope_everywhere", "rope_everywhere"):
            tag_worker_logs(name)
            logging.getLogger("megatron_hypenet").info("stage distill")
        lines = capfd.readouterr().err.splitlines()
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.handlers[:], root.level = saved[0], saved[1]
    assert [line.split(" INFO ")[1] for line in lines] == ["megatron_hypenet [nope_everywhere]: stage distill",
                                                           "megatron_hypenet [rope_everywhere]: stage distill"]


def test_decode_speed_wiring_on_cpu(smoke):
    """The GPU-only decode timing, run on CPU in fp32: both exports go through the benchmark's decode path
    and agree with their HF forward (the timings themselves mean nothing here)."""
    work, _, _ = smoke
    out = decode_speed({TEACHER: str(work / "hf_teacher"), STUDENT: str(work / "hf_student")}, 200, 64, device="cpu")
    for name in (TEACHER, STUDENT):
        assert out[name]["status"] == "ok" and out[name]["decode_ms"] > 0
        assert out[name]["logits_check"] < 1e-4


# ---- the HALO stages' speed flags in a whole recipe ------------------------------------------------------

# the HALO stages that examples/reproduce.yaml runs with --cuda-graph and with --compile (run 20)
GPU_STAGES = load_recipe(GPU)["stages"]
FAST_GRAPHED = tuple(s for s in HALO_STAGES if GPU_STAGES[s].get("cuda_graph"))
FAST_COMPILED = tuple(s for s in HALO_STAGES if GPU_STAGES[s].get("compile"))


@pytest.fixture(scope="module")
def fast_smoke(tmp_path_factory):
    """The smoke recipe with the speed flags of examples/reproduce.yaml's HALO stages: --compile in distill, and
    on a GPU --cuda-graph in align, distill and finetune (it needs one); with Gated DeltaNet's
    ablation and three workers. A worker trains stage after stage in one process, where compiled Gated DeltaNet
    layers once failed (test_compile.py, test_compiled_layers_take_another_stage_shape)."""
    root = tmp_path_factory.mktemp("reproduce_fast")
    recipe = load_recipe(SMOKE)
    recipe["ablation_workers"] = 3
    recipe["ablations"]["gated_deltanet"] = {"kind": "mixer", "options": {"rnn_mixer": "gated_deltanet"}}
    graphed = FAST_GRAPHED if torch.cuda.is_available() else ()
    for stage in graphed:
        recipe["stages"][stage]["cuda_graph"] = True
    for stage in FAST_COMPILED:
        recipe["stages"][stage]["compile"] = True
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    report = run_recipe(str(root / "recipe.yaml"), str(root / "run"))
    return root / "run", report, recipe, graphed


def test_fast_recipe_trains_every_model_with_its_flags(fast_smoke):
    work, report, recipe, graphed = fast_smoke
    assert list(report["models"]) == [TEACHER, STUDENT, *recipe["ablations"]]  # a failed ablation has no row
    for name in (None, *recipe["ablations"]):
        for stage in HALO_STAGES:
            if name and stage == "align" and recipe["ablations"][name].get("reuse_align"):
                continue
            config = yaml.safe_load((work / "checkpoints" / (name or "") / stage / "config.yaml").read_text())
            assert (config["cuda_graph"], config["compile"]) == (stage in graphed, stage in FAST_COMPILED), (name, stage)


def test_fast_recipe_follows_the_eager_losses(fast_smoke, smoke):
    """The main student's stages against the eager smoke run (the same teacher, data and seeds): graphs replay
    eager's kernels and compiled ones round differently at the 1e-6 level (fp32), so a step beyond a 2^-8 share of
    the stage's largest loss is a bug (stale gradients, a batch not copied into the graph)."""
    fast, eager = fast_smoke[1]["loss_curves"], smoke[1]["loss_curves"]
    for stage in HALO_STAGES:
        tol = 2.0 ** -8 * max(abs(loss) for _, loss in eager[stage])
        assert [i for i, _ in fast[stage]] == [i for i, _ in eager[stage]], stage
        bad = [(i, f, e) for (i, f), (_, e) in zip(fast[stage], eager[stage]) if abs(f - e) > tol]
        assert not bad, f"{stage}: (iteration, fast loss, eager loss) beyond {tol:.3g}: {bad}"


# ---- the GPU recipe, checked without running it ---------------------------------------------------------


def test_gpu_recipe_sizes_and_budget():
    from transformers import Qwen3ForCausalLM

    from megatron_hypenet.tiny import tiny_qwen3_config

    recipe = load_recipe(GPU)
    spec = {k: v for k, v in recipe["make_tiny_teacher"].items() if not k.startswith("tokenizer_")}
    config = tiny_qwen3_config(vocab_size=recipe["make_tiny_teacher"]["tokenizer_vocab_size"], **spec)
    with torch.device("meta"):
        params = sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())
    assert 50e6 <= params <= 150e6, params  # issue #7: a ~50-150M teacher
    # tools/bench_training.py --model reproduce-teacher times this shape (docs/benchmarks.md)
    from tools.estimate_memory import PRESETS

    assert PRESETS["reproduce-teacher"] == dict(
        hidden_size=spec["hidden_size"], num_layers=spec["num_layers"], num_attention_heads=spec["heads"],
        num_query_groups=spec["kv_heads"], kv_channels=spec["head_dim"], ffn_hidden_size=spec["ffn"],
        vocab_size=recipe["make_tiny_teacher"]["tokenizer_vocab_size"], tie_word_embeddings=spec["tie"])
    assert recipe["stages"]["pretrain"]["compile"]  # 2.04x on an H200 (docs/benchmarks.md)
    # runs 20-24 (docs/results_runs.md) trained every model with these; fast_smoke checks the same flags end to end
    assert (FAST_GRAPHED, FAST_COMPILED) == (("align", "distill", "finetune"), ("distill",))
    assert 1024 <= recipe["common"]["seq_length"] <= 2048 and recipe["common"]["bf16"]
    tokens = {stage: planned_tokens(recipe, stage) for stage in ("pretrain", *HALO_STAGES)}
    budget = halo_budget(tokens)
    assert budget["percent_of_teacher"] <= 2.0, budget  # issue #7: at most 2% of the teacher's tokens
    assert budget["halo_tokens"] == 4_300_800 and tokens["pretrain"] == 216_268_800  # the arithmetic in the yaml
    ev = recipe["eval"]
    assert ev["needle_multipliers"] == [1, 2, 4, 8] and ev["needle_examples"] >= 100
    assert set(ev["tasks"]) == {"needle", "passkey"}
    # the ablations, with the patterns they will get from run 8's selection sweep (docs/results/run8/report.json)
    assert recipe["stages"]["select"]["select_score"] == "recall"
    with open(os.path.join(ROOT, "docs", "results", "run8", "report.json")) as f:
        sweep = json.load(f)["selection"]
    selected = rescored_pattern({**sweep, "layer_pattern": "L" * 12}, "recall")
    sweep["layer_pattern"] = selected
    assert selected == "ALLLLALLLLAL"  # layers 0, 5, 10: the largest recall drops
    patterns = {name: ablation_pattern(spec, selected, sweep) for name, spec in recipe["ablations"].items()}
    assert patterns == {"rope_everywhere": selected, "nope_everywhere": selected, "even_spacing": "LLLALLLALLLA",
                        "gated_deltanet": "ADDDDADDDDAD", "hype_seed2": selected, "nope_everywhere_seed2": selected,
                        "muon_lr_2e-3": selected, "muon_lr_4e-3": selected,
                        "attention_layers_4": "ALLLLALLLAAL", "attention_layers_2": "LLLLLALLLLAL"}  # one more, one fewer
    # every variant spends the main student's HALO tokens
    for name in recipe["ablations"]:
        spent = sum(planned_tokens(recipe, s, ablation=name) for s in HALO_STAGES)
        assert spent == budget["halo_tokens"], name
    distill, finetune = recipe["stages"]["distill"], recipe["stages"]["finetune"]
    assert distill["train_only_mixers"] and finetune["train_only_mixers"] and distill["lr_wsd_decay_fraction"] == 0.5
    assert (distill["lr"], distill["train_iters"], finetune["train_iters"]) == (1.5e-3, 1500, 60)
    # run 18: seed-2 replicates of the main student and of NoPE everywhere (each its own align), pooled by the
    # position target with what they replicate
    assert position_ablations({"ablations": recipe["ablations"]}) == ["rope_everywhere", "nope_everywhere"]
    check_ablations(recipe["ablations"], recipe["stages"], recipe["common"])
    # run 23: nine trainer processes on one H100 failed to allocate CUDA memory; run 21's seven fitted
    assert recipe["ablation_workers"] + 1 <= 7
    assert recipe["ablations"]["muon_lr_2e-3"]["stages"] == {"distill": {"optimizer": "muon", "lr": 2e-3}}
    assert {n: a["replicate_of"] for n, a in recipe["ablations"].items() if "replicate_of" in a} == {
        "hype_seed2": "main", "nope_everywhere_seed2": "nope_everywhere"}
    assert not any(recipe["ablations"][n].get("reuse_align") for n in ("hype_seed2", "nope_everywhere_seed2"))
    # the main student aligns with the calibrated init (the default). Align and distill build the student with the
    # short conv (distill refuses an align checkpoint of the other kind); select and finetune take the architecture
    # from their --load checkpoint and carry the flag so that their command lines say what the model is
    assert "align_init" not in recipe["stages"]["align"]
    assert all(recipe["stages"][stage]["lightning_short_conv"] for stage in ("align", "select", "distill", "finetune"))
    # run 12: the RNN layers' output norm per head in every student but all_heads_norm (the paper's, its own align)
    assert all(recipe["stages"][stage]["lightning_output_norm_per_head"]
               for stage in ("align", "select", "distill", "finetune"))
    # run 13: the HyPE attention layers start distill from their aligned twins
    assert "--attention-twins" in stage_command("align", recipe["stages"]["align"])


def test_budget_recipe_is_the_gpu_recipe_with_budget_variants():
    """examples/reproduce_budget.yaml trains reproduce.yaml's teacher and main student, and that student again on
    2x and 3x the distill and finetune iterations from the main align, at the budgets its comments give."""
    gpu, budget = load_recipe(GPU), load_recipe(BUDGET)
    assert {k: v for k, v in budget.items() if k not in ("name", "work_dir", "ablations")} == {
        k: v for k, v in gpu.items() if k not in ("name", "work_dir", "ablations")}
    assert budget["work_dir"] != gpu["work_dir"]  # the two experiments never resume from each other's checkpoints
    check_ablations(budget["ablations"], budget["stages"], budget["common"])
    tokens = {stage: planned_tokens(budget, stage) for stage in ("pretrain", *HALO_STAGES)}
    assert halo_budget(tokens)["halo_tokens"] == 4_300_800
    spent = {}
    for name, spec in budget["ablations"].items():
        assert spec["kind"] == "budget" and spec["reuse_align"]
        spent[name] = tokens["align"] + sum(planned_tokens(budget, s, ablation=name) for s in ("distill", "finetune"))
    assert spent == {"budget_x2": 7_618_560, "budget_x3": 10_936_320}
    assert [round(100 * spent[n] / tokens["pretrain"], 2) for n in spent] == [3.52, 5.06]


def test_recipe_base_replaces_top_level_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("name: a\nstages: {distill: {lr: 1.0e-3}}\nablations: {x: {kind: budget}}\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nname: b\nablations: {y: {kind: selection}}\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nwork_dir: runs/c\n")
    assert load_recipe(str(tmp_path / "c.yaml")) == {"name": "b", "work_dir": "runs/c", "stages": {
        "distill": {"lr": 1.0e-3}}, "ablations": {"y": {"kind": "selection"}}}
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere.yaml \(the base of .*missing.yaml\): file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    (tmp_path / "loop.yaml").write_text("base: sub/loop.yaml\n")
    (tmp_path / "sub" / "loop.yaml").write_text("base: ../loop.yaml\n")
    with pytest.raises(ValueError, match="leads back to itself"):
        load_recipe(str(tmp_path / "loop.yaml"))
    for text, match in (("base: [a.yaml]\n", "give the path of another recipe"), ("- a\n", "YAML mapping")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ValueError, match=match):
            load_recipe(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("page", ["results.md", "results_budget.md"])
def test_published_page_is_its_report_rendered(page):
    """A published results page above its hand-written reading is exactly what write_results renders from the
    report published beside it: no number on the page was typed by hand."""
    page = open(os.path.join(ROOT, "docs", page)).read()
    generated, reading = page.split("\n## Reading the results (hand-written", 1)
    links = re.findall(r"\]\((results/\w+)/report\.json\)", reading)
    assert links, "the reading links the run's report"
    with open(os.path.join(ROOT, "docs", links[0], "report.json")) as f:
        report = json.load(f)
    assert generated == markdown(report, links[0])
    for plot in PLOTS.values():
        assert os.path.exists(os.path.join(ROOT, "docs", links[0], plot)), plot


@pytest.mark.parametrize("path", [GPU, BUDGET, os.path.join(ROOT, "examples", "tiny_gpu.yaml"),
                                  os.path.join(ROOT, "examples", "calibration_proxy.yaml"),
                                  os.path.join(ROOT, "examples", "budget_proxy.yaml"),
                                  os.path.join(ROOT, "examples", "head_dim_proxy.yaml"),
                                  os.path.join(ROOT, "examples", "rope_theta_proxy.yaml"),
                                  os.path.join(ROOT, "examples", "scale_proxy.yaml")])
def test_gpu_recipe_flags_parse(path):
    """Every stage's flags (with each ablation's options and per-stage flags) are pretrain_hypenet.py flags, and the
    teacher's shape is one tiny_qwen3_config takes."""
    from megatron_hypenet.arguments import build_parser, parse_args
    from megatron_hypenet.recipe import to_flags
    from megatron_hypenet.tiny import tiny_qwen3_config

    recipe = load_recipe(path)
    shape = {k: v for k, v in recipe["make_tiny_teacher"].items() if not k.startswith("tokenizer_")}
    assert tiny_qwen3_config(**shape).num_hidden_layers == shape["num_layers"]
    known = {a.dest for a in build_parser()._actions}
    for spec in [{}, *recipe.get("ablations", {}).values()]:
        for stage, flags in variant_stages(recipe["stages"], spec).items():
            options = {**recipe["common"], **flags}  # (variant_stages puts the ablation's options in)
            assert set(options) <= known, set(options) - known
            args = parse_args(["--stage", stage, *to_flags({**options, "data_path": "d", "teacher": "t", "load": "l"})])
            assert args.seq_length == options["seq_length"] and args.bf16 == recipe["common"].get("bf16", False)


def test_ablation_pattern_errors():
    with pytest.raises(ValueError, match="give 'selected', 'even'"):
        ablation_pattern({"layer_pattern": "AL"}, "LLLA")
    with pytest.raises(ValueError, match="rnn_mixer 'mamba'"):
        ablation_pattern({"options": {"rnn_mixer": "mamba"}}, "LLLA")
    with pytest.raises(ValueError, match="the student has 4 layers; keep at most 3 as attention"):
        ablation_pattern({"layer_pattern": "even", "num_attention_layers": 4}, "LLLA")
    for spec in ({"layer_pattern": "even", "num_attention_layers": 0}, {"layer_pattern": "even",
                 "num_attention_layers": "2"}, {"num_attention_layers": 2}, {"layer_pattern": "LLAA",
                 "num_attention_layers": 2}, {"layer_pattern": "recall", "num_attention_layers": True}):
        with pytest.raises(ValueError, match="give a whole number >= 1 with layer_pattern 'even' or one of"):
            check_ablations({"x": {"kind": "selection", **spec}})
    check_ablations({"x": {"kind": "selection", "layer_pattern": "ratio", "num_attention_layers": 2}})
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        k = rng.randint(1, n)
        pattern = even_pattern(n, k)
        assert len(pattern) == n and pattern.count("A") == k and pattern[-1] == "A"


def test_fixed_pattern_recipe_keeps_each_ablations_pattern(tmp_path):
    """Without a select stage the main student takes stages.distill.layer_pattern, and an ablation's own
    pattern still wins over it (it is the ablation's distill flag, and the one reported)."""
    recipe = load_recipe(SMOKE)
    del recipe["stages"]["select"]
    n = recipe["make_tiny_teacher"]["num_layers"]
    main, other = "L" * (n - 1) + "A", "A" + "L" * (n - 1)
    recipe["stages"]["distill"]["layer_pattern"] = main
    recipe["ablations"] = {"first_layer": {"kind": "selection", "reuse_align": True, "layer_pattern": other}}
    recipe["eval"]["needle_multipliers"] = [1]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    report = run_recipe(str(tmp_path / "recipe.yaml"), str(tmp_path / "run"))
    assert report["layer_pattern"] == main and report["selection"] is None
    assert report["ablations"]["first_layer"]["layer_pattern"] == other
    distills = [c for c in report["commands"] if c.startswith("python pretrain_hypenet.py --stage distill ")]
    assert [c.split("--layer-pattern ")[1].split()[0] for c in distills] == [main, other]
    assert not any("--stage select" in c for c in report["commands"])


def test_budget_scale_multiplies_the_halo_iterations():
    from megatron_hypenet.recipe import scaled_stage, variant_halo_tokens

    assert scaled_stage({"train_iters": 7, "lr": 1e-3}, 3) == {"train_iters": 21, "lr": 1e-3}
    assert scaled_stage({"train_iters": 3}, 0.1) == {"train_iters": 1}  # never zero iterations
    assert scaled_stage({"num_attention_layers": 3}, 2) == {"num_attention_layers": 3}
    tokens = {"align": 10, "distill": 20, "x/align": 30, "x/distill": 60, "x/finetune": 5}
    assert variant_halo_tokens(tokens, "x", reused_align=False) == 95
    assert variant_halo_tokens({**tokens, "x/align": 0}, "x", reused_align=True) == 75
    for bad in (0, -1, "2", True):
        with pytest.raises(ValueError, match="budget_scale must be a number > 0"):
            check_ablations({"x": {"kind": "budget", "budget_scale": bad}})


def test_ablation_stage_flags_are_checked():
    stages = {"align": {"lr": 1e-2}, "distill": {"lr": 1e-3, "train_iters": 8}, "finetune": {"lr": 3e-4}}
    assert variant_stages(stages, {"stages": {"distill": {"lr": 2e-3}}}) == {
        "align": {"lr": 1e-2}, "distill": {"lr": 2e-3, "train_iters": 8}, "finetune": {"lr": 3e-4}}
    assert variant_stages(stages, {}) == stages
    # a stage's own flags win over `options`; budget_scale multiplies the recipe's train_iters, not the variant's own
    spec = {"options": {"lr": 5e-4, "train_iters": 3}, "stages": {"distill": {"lr": 2e-3}}, "budget_scale": 2}
    assert variant_stages(stages, spec) == {"align": {"lr": 5e-4, "train_iters": 3},
                                            "distill": {"lr": 2e-3, "train_iters": 3},
                                            "finetune": {"lr": 5e-4, "train_iters": 3}}
    assert variant_stages(stages, {"budget_scale": 2})["distill"] == {"lr": 1e-3, "train_iters": 16}
    for bad in ({"select": {"num_attention_layers": 2}}, {"distill": 2e-3}, [{"distill": {}}]):
        with pytest.raises(ValueError, match="give {stage: {flag: value}}"):
            check_ablations({"x": {"kind": "training", "stages": bad}})
    with pytest.raises(ValueError, match="stages.align flags need the variant's own align; drop reuse_align"):
        check_ablations({"x": {"kind": "training", "reuse_align": True, "stages": {"align": {"lr": 3e-3}}}})
    check_ablations({"x": {"kind": "training", "stages": {"align": {"lr": 3e-3}}}})


def test_ablation_names_of_the_main_run_are_refused():
    for name in ("student", "teacher", "align", "main"):
        with pytest.raises(ValueError, match="belong to the main run"):
            check_ablations({name: {"kind": "selection"}})


def test_replicates_must_train_as_their_original_on_other_seeds():
    nope = {"kind": "position", "options": {"no_lightning_rope": True}}
    stages = {"align": {"lr": 1e-2}, "distill": {"lr": 1e-3}, "finetune": {"lr": 3e-4}}
    ok = {"nope": nope, "nope_s2": {"kind": "position", "replicate_of": "nope",
                                    "options": {"no_lightning_rope": True, "seed": 2}},
          "main_s2": {"kind": "replicate", "replicate_of": "main", "options": {"seed": 2}}}
    check_ablations(ok, stages, {})
    for origin in ("nowhere", "main_s2", "self"):
        with pytest.raises(ValueError, match="give 'main' or the name of another ablation that is not itself a rep"):
            check_ablations({**ok, "self": {"replicate_of": origin, "options": {"seed": 2}}}, stages, {})
    for spec, differ in (({"options": {"seed": 2, "no_lightning_rope": False}}, "options"),
                         ({"options": {"seed": 2}}, "options"),  # nope's own option dropped
                         ({"options": {"no_lightning_rope": True, "seed": 2}, "reuse_align": True}, "reuse_align"),
                         ({"options": {"no_lightning_rope": True, "seed": 2}, "stages": {"distill": {"lr": 2e-3}}},
                          "stages")):
        with pytest.raises(ValueError, match=rf"replicates 'nope' but differs from it in \['{differ}'\]"):
            check_ablations({"nope": nope, "r": {"replicate_of": "nope", **spec}}, stages, {})
    with pytest.raises(ValueError, match=r"replicates 'main' but differs from it in \['layer_pattern'\]"):
        check_ablations({"r": {"replicate_of": "main", "options": {"seed": 2}, "layer_pattern": "even"}}, stages, {})
    # the seed: given, and not the original's, whether that is the default or set in common or a stage
    with pytest.raises(ValueError, match=r"replicates 'main' on its seed \(1234\): give options.seed another"):
        check_ablations({"r": {"replicate_of": "main"}}, stages, {})
    with pytest.raises(ValueError, match=r"replicates 'main' on its seed \(1234\)"):
        check_ablations({"r": {"replicate_of": "main", "options": {"seed": 1234}}}, stages, {})
    with pytest.raises(ValueError, match=r"replicates 'main' on its seed \(2\)"):
        check_ablations({"r": {"replicate_of": "main", "options": {"seed": 2}}}, stages, {"seed": 2})
    seeded = {**nope, "options": {"no_lightning_rope": True, "seed": 5}}  # an original on a seed of its own
    with pytest.raises(ValueError, match=r"replicates 'n' on its seed \(5\)"):
        check_ablations({"n": seeded, "r": {"replicate_of": "n", "options": {"no_lightning_rope": True, "seed": 5}}},
                        stages, {})
    check_ablations({"n": seeded, "r": {"replicate_of": "n", "options": {"no_lightning_rope": True, "seed": 1234}}},
                    stages, {})


def test_position_target_pools_replicates(smoke):
    _, report, _ = smoke
    r = copy.deepcopy(report)
    r["multipliers"], r["needle_examples"] = [1, 2, 4, 8], 100
    for row in r["models"].values():
        for task in r["tasks"]:
            for m in (4, 8):
                row[f"{task}@{m}x"] = 0.5
    models = r["models"]
    models["nope_everywhere"].update({f"{t}@{m}x": 0.6 for t in r["tasks"] for m in (4, 8)})
    models[STUDENT].update({f"{t}@{m}x": 0.62 for t in r["tasks"] for m in (4, 8)})
    alone = targets(r)[2]
    assert alone["met"] is False and "HyPE (2 runs) 0.56" in alone["value"]  # student_seed2 (0.5) pulls it under 0.6
    models["student_seed2"].update({f"{t}@{m}x": 0.66 for t in r["tasks"] for m in (4, 8)})
    # HyPE 0.64 over 2 runs (256 of 400 prompts) vs nope_everywhere 0.6 (120 of 200)
    pooled = targets(r)[2]
    assert pooled["met"] is True and "4x: HyPE (2 runs) 0.64 vs" in pooled["value"]
    assert f"nope_everywhere 0.60 (p = {fisher_exact(256, 400, 120, 200):.2g})" in pooled["value"]
    # a replicate of nope_everywhere pulls its side up: 0.6 and 0.7 pool to 0.65 > 0.64
    r["ablations"]["nope_seed2"] = {**r["ablations"]["nope_everywhere"], "replicate_of": "nope_everywhere"}
    models["nope_seed2"] = {**models["nope_everywhere"], **{f"{t}@{m}x": 0.7 for t in r["tasks"] for m in (4, 8)}}
    both = targets(r)[2]
    assert both["met"] is False and "nope_everywhere (2 runs) 0.65" in both["value"]
    assert "nope_seed2" not in both["value"]  # not a third position ablation
    page = markdown({**r, "long_loss": None})
    assert "| nope_seed2 | replicate of nope_everywhere |" in page and "| student_seed2 | replicate of main |" in page
    assert "Replicates (`replicate_of`" in page
    del r["models"]["nope_seed2"]  # a replicate that failed is left out of the pool
    assert "nope_everywhere 0.60" in targets(r)[2]["value"]


def test_a_failed_ablation_keeps_to_one_table_row():
    """Run 23's five failed ablations (NCCL errors of several lines, docs/results/run23) render as one row each."""
    with open(os.path.join(ROOT, "docs", "results", "run23", "report.json")) as f:
        report = json.load(f)
    failed = [line for line in markdown(report).splitlines() if "| failed: " in line]
    assert len(failed) == 5, failed
    assert all(line.startswith("| ") and line.endswith(" |") and line.count(" | ") == 3 for line in failed), failed


def test_a_loss_only_report_renders_without_retrieval(tmp_path):
    """`eval: {tasks: []}` (held-out loss only) still writes the page and plots; the position target says why it is
    not read instead of dividing by the number of tasks."""
    with open(os.path.join(ROOT, "docs", "results", "run23", "report.json")) as f:
        report = json.load(f)
    report["tasks"] = []
    for row in report["models"].values():
        for key in [k for k in row if k.split("@")[0] in ("needle", "passkey")]:
            del row[key]
    position = [t for t in targets(report) if t["target"].startswith("HyPE better")]
    assert len(position) == 1 and position[0]["met"] is None and "retrieval not evaluated" in position[0]["value"]
    write_results(report, str(tmp_path / "results.md"))
    page = (tmp_path / "results.md").read_text()
    assert "Held-out loss by position" in page and "needle@4x not evaluated" in page


def test_command_line_changes_are_what_ran(smoke):
    """The smoke run's --set changes reached the training (its report has the broken ablation and two workers), its
    results folder keeps the recipe as it ran, and the report's command gives the changes back."""
    work, report, recipe = smoke
    ran = yaml.safe_load((work / "results" / "recipe.yaml").read_text())
    assert ran == apply_overrides(load_recipe(SMOKE), SMOKE_SETS) and ran["ablations"]["broken"] == BROKEN
    assert report["ablation_workers"] == 2 and "error" in report["ablations"]["broken"]
    words = shlex.split(report["command"])
    assert [words[i + 1] for i, w in enumerate(words) if w == "--set"] == SMOKE_SETS


def test_set_and_ablations_change_a_recipe_or_say_what_it_has(monkeypatch, tmp_path):
    recipe = load_recipe(GPU)
    changed = apply_overrides(recipe, ["stages.pretrain.train_iters=3300", "eval.tasks=[]",
                                       "+stages.distill.optimizer=muon", "+eval.note=two words"],
                              ablations="muon_lr_4e-3, gated_deltanet")
    assert changed["stages"]["pretrain"]["train_iters"] == 3300 and changed["eval"]["tasks"] == []
    assert changed["stages"]["distill"]["optimizer"] == "muon" and changed["eval"]["note"] == "two words"
    assert list(changed["ablations"]) == ["gated_deltanet", "muon_lr_4e-3"]  # the recipe's order
    assert recipe == load_recipe(GPU)  # the loaded recipe is left as it was
    assert apply_overrides(recipe, ablations="none")["ablations"] == {}
    for sets, ablations, words in [
            (["stages.pretrain.train_iter=5"], None, "no key stages.pretrain.train_iter; keys there: train_iters"),
            (["stages.pretrian.lr=1"], None, "no mapping stages.pretrian; its keys there: pretrain, align"),
            (["stages.pretrain.lr.x=1"], None, "no mapping stages.pretrain.lr"),
            (["stages.pretrain.lr"], None, "give dotted.key=VALUE"),
            ([], "muon,nope", "--ablations: muon, nope not in the recipe; its ablations: rope_everywhere")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            apply_overrides(recipe, sets, ablations)

    import tools.halo as halo
    import megatron_hypenet.recipe as recipe_module

    work = tmp_path / "work"
    with pytest.raises(SystemExit) as usage:
        halo.main(["--recipe", GPU, "--work-dir", str(work), "--set", "stages.pretrain.train_iter=5"])
    assert usage.value.code == 2 and not work.exists()  # refused before the recipe runs
    seen = {}
    monkeypatch.setattr(recipe_module, "run_recipe", lambda path, work, **kw: seen.update(path=path, work=work, **kw))
    halo.main(["--recipe", GPU, "--set", "eval.tasks=[]", "--ablations", "muon_lr_2e-3"])
    assert seen["sets"] == ["eval.tasks=[]"] and seen["ablations"] == "muon_lr_2e-3" and seen["work"] is None
    assert shlex.split(seen["command"])[-4:] == ["--set", "eval.tasks=[]", "--ablations", "muon_lr_2e-3"]


def test_a_continued_run_with_another_recipe_keeps_the_one_before(tmp_path, caplog):
    from megatron_hypenet.recipe import _record_recipe

    recipe = load_recipe(GPU)
    _record_recipe(str(tmp_path), recipe)
    _record_recipe(str(tmp_path), recipe)  # the same recipe continued: nothing to keep
    assert sorted(os.listdir(tmp_path)) == ["recipe.yaml"] and not caplog.records
    changed = apply_overrides(recipe, ["stages.distill.lr=1e-3", "eval.tasks=[]"], ablations="none")
    _record_recipe(str(tmp_path), changed)
    assert yaml.safe_load((tmp_path / "recipe.1.yaml").read_text()) == recipe
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text()) == changed
    warning = caplog.records[-1].getMessage()
    keys = re.search(r"changed: (.*)\); ", warning).group(1).split(", ")
    assert sorted(keys) == sorted(["stages.distill.lr", "eval.tasks", *(f"ablations.{n}" for n in recipe["ablations"])])
    assert "recipe.1.yaml" in warning
    _record_recipe(str(tmp_path), recipe)  # and back: the second change is kept too, not written over the first
    assert yaml.safe_load((tmp_path / "recipe.2.yaml").read_text()) == changed
    assert sorted(os.listdir(tmp_path)) == ["recipe.1.yaml", "recipe.2.yaml", "recipe.yaml"]
