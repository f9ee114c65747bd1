"""One-command HALO recipes: teacher -> data -> align -> select -> distill -> finetune -> HF export -> report.

Every stage runs through the same entry point as `pretrain_hypenet.py` with flags built from the
recipe, so a recipe is exactly a sequence of commands a user could type (the report lists them). A
stage whose checkpoint is already complete is skipped and an interrupted one resumes, so re-running a
recipe continues it. A stage pre-empted by SIGTERM / SIGUSR1 (it saves and returns early) stops the whole
recipe: the next stage must not start from a half-trained one.

Recipe keys beyond the stages (see examples/tiny.yaml and examples/reproduce.yaml); tools/halo.py's `--set` and
`--ablations` change them on the command line (`apply_overrides`, after `base`), and the work folder keeps the recipe
as it ran (`recipe.yaml`; a re-run with another recipe keeps the one before as `recipe.<n>.yaml`):

- `base: other.yaml` (a path relative to this recipe): start from that recipe, and let each top-level key of this
  file replace the base's whole (an `ablations` key replaces all of the base's ablations; `stages` all its stages).
  One experiment can then change the variants or the name of another without copying its teacher and stages.
- `data.local_corpus: {max_bytes, heldout_fraction, ...}`: the corpus is the Python sources and docs
  installed on this machine (tools/build_local_corpus.py), split by file; the tokenizer and the teacher
  train on the training files, and the held-out loss and the retrieval haystacks come from the held-out
  files.
- Without a `select` stage the main student takes `stages.distill.layer_pattern` (a fixed pattern).
- `ablations: {name: {kind, options, stages, reuse_align, layer_pattern, num_attention_layers, budget_scale,
  replicate_of}}`: student
  variants, each its own distill + finetune (and align unless `reuse_align`: true when `options` do not change what
  align trains, i.e. only the attention layers or the pattern differ), exported and evaluated like the main student.
  `options` are stage flags applied to the variant's align, distill and finetune, `stages: {align|distill|finetune:
  {flags}}` flags of one stage (over the recipe's `stages` and `options`, e.g. another distill lr); `layer_pattern` is
  `selected` (the main run's select result, the default), `even` (as many attention layers, evenly spaced; no select
  run), `recall` or `ratio` (the main run's selection sweep ranked by that --select-score: the same measurements,
  another rule) or a literal pattern; with `even` or a score, `num_attention_layers` keeps that many attention layers
  instead of the main student's number. With `options.rnn_mixer` the recurrent layers of the pattern take that mixer's
  letter (`config.RNN_MIXERS`). `budget_scale: k` multiplies the recipe's `train_iters` of the HALO stages the variant
  trains (its align unless reused, distill, finetune): the same student on k times the tokens. `kind: position`
  marks the ablations the "HyPE beats its ablations" target compares with; the results page tabulates the loss gap
  against HALO tokens for the main run and the `kind: budget` ones. `replicate_of: main` (or an ablation's name)
  trains the main student (that ablation) again with another `options.seed`, i.e. other batches: the position
  target pools a replicate's retrieval counts with those of what it replicates, so that one seed's luck does not
  decide it. A replicate must train exactly as its original apart from the seed.
- `ablation_workers: N` (default 1): train N ablations at once, each in a process of its own, beside the main
  student: a variant's own align (it needs only the teacher) beside the main align and select, the rest
  (which needs the selected pattern) beside the main distill and finetune. Small students leave the GPU idle
  while the host launches their kernels, so they can share it; their tokens/s are then shared too.
- `eval`: `tasks` (needle, passkey), `needle_multipliers` (prompt lengths of every task, in training
  lengths), `needle_examples` (prompts per task and length), `loss_samples`, `batch_tokens` (tokens per
  evaluation forward), `long_loss_windows` (held-out windows of the longest prompt length whose loss is
  reported by position, `loss@Mx`: the tokens past the previous length up to M training lengths; needs
  `data.local_corpus`), `decode_compile` (torch.compile backend of the decode-speed step; GPU only).
"""

import contextlib
import copy
import datetime
import gc
import itertools
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import List, Optional

import torch
import yaml

from megatron_hypenet.files import replaced_atomically
from megatron_hypenet.patterns import evenly_spaced as even_pattern  # "even" in recipes and ablations

log = logging.getLogger("megatron_hypenet")

STAGE_ORDER = ("pretrain", "align", "select", "distill", "finetune")
TEACHER, STUDENT = "teacher (Qwen3)", "student (HypeNet)"
ABLATION_KEYS = {"kind", "options", "stages", "reuse_align", "layer_pattern", "num_attention_layers", "budget_scale",
                 "replicate_of"}
MAIN = "main"  # `replicate_of: main`: a replicate of the main student
# what a replicate shares with its original (with their defaults): everything that decides how it trains
REPLICATE_SHARED = {"options": {}, "stages": {}, "reuse_align": False, "layer_pattern": "selected",
                    "num_attention_layers": None, "budget_scale": 1}
HALO_STAGES = ("align", "distill", "finetune")  # the training stages of the HALO token budget
RESERVED_NAMES = {"teacher", "teacher_init", "student", MAIN, *STAGE_ORDER}  # the main run's folder names, and MAIN
# relative L2 of the benchmark decode step's bf16 logits against the HF model's (4-5e-3 on the issue-7 runs)
DECODE_CHECK_TOLERANCE = 5e-2


class Preempted(BaseException):
    """A stage saved and stopped early on a pre-emption signal. A BaseException, like KeyboardInterrupt,
    so that the ablation loop, which records an ablation's errors and goes on, lets it through."""


def to_flags(options: dict) -> List[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def load_recipe(path: str, _children: tuple = ()) -> dict:
    """The recipe at `path`, with its `base` (and the base's own) applied: top-level keys replace the base's."""
    if not os.path.exists(path):
        via = f" (the base of {_children[-1]})" if _children else ""
        raise FileNotFoundError(f"recipe {path}{via}: file not found")
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path}: a YAML mapping of recipe keys expected, got {type(recipe).__name__}")
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    if not isinstance(base, str):
        raise ValueError(f"recipe {path}: base: {base!r}; give the path of another recipe, relative to this file")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    chain = (*_children, os.path.normpath(path))
    if base_path in chain:
        raise ValueError(f"recipe {path}: base {base} leads back to itself ({' -> '.join(chain + (base_path,))})")
    return {**load_recipe(base_path, chain), **recipe}


class RecipeOverrideError(ValueError):
    """A --set or --ablations that does not fit the recipe: a usage error, raised before anything runs."""


def apply_overrides(recipe: dict, sets=(), ablations: Optional[str] = None) -> dict:
    """The recipe with command-line changes (tools/halo.py --set, --ablations), so that one experiment on a recipe
    needs no edited copy of it and the report's command says what changed.

    `sets`: "dotted.key=VALUE", VALUE read as YAML (`3300`, `[]`, `muon`, `{lr: 2e-3}`). The key must exist, so a
    typo fails here instead of becoming a stage flag; "+dotted.key=VALUE" adds a new one (as Hydra's "+").
    `ablations`: names to keep, comma-separated, in the recipe's order; "none" keeps none."""
    recipe = copy.deepcopy(recipe)
    for item in sets:
        key, sep, text = item.partition("=")
        add = key.startswith("+")
        path = key.lstrip("+").split(".")
        if not sep or not all(path):
            raise RecipeOverrideError(f"--set {item!r}: give dotted.key=VALUE, e.g. stages.pretrain.train_iters=3300")
        node = recipe
        for i, part in enumerate(path[:-1]):
            if not isinstance(node.get(part), dict):
                where = ".".join(path[:i + 1])
                raise RecipeOverrideError(f"--set {item!r}: the recipe has no mapping {where}; its keys there: "
                                          f"{', '.join(map(str, node)) or 'none'}")
            node = node[part]
        if path[-1] not in node and not add:
            raise RecipeOverrideError(f"--set {item!r}: the recipe has no key {key}; keys there: "
                                      f"{', '.join(map(str, node)) or 'none'} (write +{key}=... to add one)")
        node[path[-1]] = yaml.safe_load(text)
    if ablations is not None:
        known = recipe.get("ablations") or {}
        keep = [] if ablations.strip() == "none" else [n.strip() for n in ablations.split(",") if n.strip()]
        unknown = [n for n in keep if n not in known]
        if unknown:
            raise RecipeOverrideError(f"--ablations: {', '.join(unknown)} not in the recipe; its ablations: "
                                      f"{', '.join(known) or 'none'}")
        recipe["ablations"] = {n: spec for n, spec in known.items() if n in keep}
    return recipe


def stage_command(stage: str, options: dict) -> str:
    return " ".join(["python pretrain_hypenet.py", "--stage", stage, *to_flags(options)])


def data_commands(recipe: dict, work: str, teacher_hf: str, prefix: str) -> List[str]:
    """The command lines equivalent to what `_prepare_teacher_and_data` and the teacher conversion did."""
    data, commands = recipe.get("data", {}), []
    if "local_corpus" in data:
        paths = local_corpus_paths(work)
        commands.append(" ".join(["python tools/build_local_corpus.py", *to_flags(
            {"output": paths["train"], "heldout": paths["heldout"], **data["local_corpus"]})]))
        inputs = [paths["train"]]
    elif "generate_corpus" in data:
        inputs = [os.path.join(work, "corpus.jsonl")]  # (megatron_hypenet.corpus.generate_corpus)
    else:
        inputs = data.get("inputs", [])
    if recipe.get("hf_teacher") is None:
        spec = recipe["make_tiny_teacher"]
        commands.append(" ".join(["python tools/train_tokenizer.py", *to_flags(
            {"input": inputs, "vocab_size": spec.get("tokenizer_vocab_size", 1024),
             "max_chars": spec.get("tokenizer_max_chars"), "output_dir": os.path.join(work, "tokenizer")})]))
        commands.append(f"# {teacher_hf}: a random Qwen3 (megatron_hypenet.tiny.save_random_qwen3) of "
                        + ", ".join(f"{k}={v}" for k, v in spec.items() if not k.startswith("tokenizer_")))
    commands.append(" ".join(["python tools/preprocess_data.py", *to_flags(
        {"input": inputs, "hf_dataset": data.get("hf_dataset"), "tokenizer": teacher_hf, "output_prefix": prefix,
         "append_eod": True, "workers": data.get("preprocess_workers", 1)})]))
    teacher_init = os.path.join(work, "checkpoints", "teacher_init")
    commands.append(f"python tools/convert_hf_to_mcore.py --hf-dir {teacher_hf} --out {teacher_init}")
    return commands


def run_stage(stage: str, options: dict) -> dict:
    from megatron_hypenet import parallel
    from megatron_hypenet.arguments import parse_args

    args = parse_args(["--stage", stage, *to_flags(options)])
    log.info("stage %s: %s", stage, stage_command(stage, options))
    try:
        if stage == "select":
            from megatron_hypenet.halo.select import run_select

            return run_select(args)
        from megatron_hypenet.training import train

        return train(args)
    finally:
        parallel.destroy()


def local_corpus_paths(work: str) -> dict:
    folder = os.path.join(work, "corpus")
    return {"train": os.path.join(folder, "train.jsonl"), "heldout": os.path.join(folder, "heldout.jsonl"),
            "stats": os.path.join(folder, "stats.json")}


def _prepare_teacher_and_data(recipe: dict, work: str) -> tuple:
    """HF teacher folder and indexed dataset prefix, made locally when the recipe asks for it."""
    from megatron_hypenet.corpus import generate_corpus
    from tools.preprocess_data import preprocess

    data = recipe.get("data", {})
    if "generate_corpus" in data:
        corpus = os.path.join(work, "corpus.jsonl")
        if not os.path.exists(corpus):
            generate_corpus(corpus, **data["generate_corpus"])
        inputs = [corpus]
    elif "local_corpus" in data:
        from tools.build_local_corpus import build_local_corpus

        paths = local_corpus_paths(work)
        if not os.path.exists(paths["stats"]):  # written last: the corpus files are complete
            stats = build_local_corpus(paths["train"], paths["heldout"], **data["local_corpus"])
            if not stats["reached_max_bytes"]:
                log.warning("local corpus: only %d bytes of text installed here, under max_bytes; the teacher "
                            "sees its data more often", stats["train_bytes"] + stats["heldout_bytes"])
            with open(paths["stats"], "w") as f:
                json.dump(stats, f, indent=2)
        inputs = [paths["train"]]
    else:
        inputs = data.get("inputs", [])
    teacher_hf = recipe.get("hf_teacher")
    if teacher_hf is None:
        from megatron_hypenet.tiny import save_random_qwen3
        from tools.train_tokenizer import train_tokenizer

        spec = dict(recipe["make_tiny_teacher"])
        vocab_size, max_chars = spec.pop("tokenizer_vocab_size", 1024), spec.pop("tokenizer_max_chars", None)
        teacher_hf = os.path.join(work, "teacher_hf_init")
        if not os.path.exists(os.path.join(teacher_hf, "config.json")):
            tok_dir = os.path.join(work, "tokenizer")
            train_tokenizer(inputs, vocab_size, tok_dir, max_chars=max_chars)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok_dir)
            save_random_qwen3(teacher_hf, seed=recipe.get("seed", 0), tokenizer_dir=tok_dir,
                              vocab_size=len(tok), eos_token_id=tok.eos_token_id, **spec)
    prefix = os.path.join(work, "data", "corpus")
    if not os.path.exists(prefix + ".idx"):
        kwargs = {"hf_dataset": data["hf_dataset"]} if "hf_dataset" in data else {}
        preprocess(inputs, teacher_hf, prefix, append_eod=True, workers=data.get("preprocess_workers", 1), **kwargs)
    return teacher_hf, prefix


def ablation_pattern(spec: dict, selected: str, selection: Optional[dict] = None) -> str:
    """The variant's layer pattern: the selected one, evenly spaced attention, the main sweep ranked by another
    --select-score (`selection`: its selection.json), or a literal; its recurrent layers in the letter of
    `options.rnn_mixer`. `num_attention_layers` makes `even` or a ranking keep that many attention layers
    instead of as many as the main student."""
    from megatron_hypenet.arguments import SELECT_SCORES

    choice = spec.get("layer_pattern", "selected")
    k = spec.get("num_attention_layers")  # its type and layer_pattern: check_ablations, before anything runs
    if k is not None and not k < len(selected):
        raise ValueError(f"num_attention_layers {k}: the student has {len(selected)} layers; keep at most "
                         f"{len(selected) - 1} as attention")
    if choice == "selected":
        pattern = selected
    elif choice == "even":
        pattern = even_pattern(len(selected), k or selected.count("A"))
    elif choice in SELECT_SCORES:
        if selection is None:
            raise ValueError(f"layer_pattern {choice!r} ranks the main run's selection sweep by that score: the "
                             "recipe needs a `select` stage")
        from megatron_hypenet.halo.select import rescored_pattern

        pattern = rescored_pattern(selection, choice, k=k)
    else:
        pattern = choice
        if len(pattern) != len(selected) or set(pattern) - {"A", "L"}:
            raise ValueError(f"layer_pattern {pattern!r}: give 'selected', 'even', one of {list(SELECT_SCORES)} or "
                             f"{len(selected)} letters A/L")
    from megatron_hypenet.config import LIGHTNING, RNN_MIXERS

    mixer = spec.get("options", {}).get("rnn_mixer", "lightning")
    if mixer not in RNN_MIXERS:
        raise ValueError(f"rnn_mixer {mixer!r}: known mixers are {sorted(RNN_MIXERS)}")
    return pattern.replace(LIGHTNING, RNN_MIXERS[mixer])


def fixed_pattern(stages: dict) -> str:
    """The main student's pattern when the recipe has no select stage: `stages.distill.layer_pattern`."""
    pattern = stages.get("distill", {}).get("layer_pattern")
    if not isinstance(pattern, str) or "A" not in pattern:
        raise ValueError("the recipe has no `select` stage, so `stages.distill.layer_pattern` must give the student's "
                         f"layer pattern (one letter per layer, some 'A'), e.g. LLLALLLALLLA; got {pattern!r}")
    return pattern


def check_ablations(ablations: dict, stages: Optional[dict] = None, common: Optional[dict] = None) -> None:
    """Refuses a malformed ablation before anything trains. `stages` and `common` (the recipe's) let it check that
    each replicate trains on other seeds than its original."""
    from megatron_hypenet.arguments import SELECT_SCORES

    for name, spec in ablations.items():
        unknown = set(spec) - ABLATION_KEYS
        if unknown:
            raise ValueError(f"ablation {name!r}: unknown keys {sorted(unknown)} (known: {sorted(ABLATION_KEYS)})")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"ablation {name!r}: use letters, digits, '_' and '-' (it names folders)")
        if name in RESERVED_NAMES:  # hf_<name> and checkpoints/<name> would be the main run's folders
            raise ValueError(f"ablation {name!r}: the names {sorted(RESERVED_NAMES)} belong to the main run")
        k, choice = spec.get("num_attention_layers"), spec.get("layer_pattern", "selected")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1
                              or choice not in ("even", *SELECT_SCORES)):
            raise ValueError(f"ablation {name!r}: num_attention_layers {k!r} with layer_pattern {choice!r}: give a "
                             f"whole number >= 1 with layer_pattern 'even' or one of {list(SELECT_SCORES)} (a "
                             "selected or literal pattern fixes its own number)")
        per_stage = spec.get("stages", {})
        if not isinstance(per_stage, dict) or set(per_stage) - set(HALO_STAGES) or \
                not all(isinstance(v, dict) for v in per_stage.values()):
            raise ValueError(f"ablation {name!r}: stages {per_stage!r}: give {{stage: {{flag: value}}}} for stages among "
                             f"{list(HALO_STAGES)} (flags for every stage go in `options`)")
        if "align" in per_stage and spec.get("reuse_align"):  # its align flags would silently do nothing
            raise ValueError(f"ablation {name!r}: stages.align flags need the variant's own align; drop reuse_align")
        scale = spec.get("budget_scale", 1)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"ablation {name!r}: budget_scale must be a number > 0 (a multiple of the HALO "
                             f"stages' train_iters), got {scale!r}")
        if "replicate_of" in spec:
            check_replicate(name, spec, ablations, stages or {}, common or {})


def check_replicate(name: str, spec: dict, ablations: dict, stages: dict, common: dict) -> None:
    """A replicate names the main student or a non-replicate ablation, trains as it does, and on other seeds."""
    from megatron_hypenet.arguments import build_parser

    origin = spec["replicate_of"]
    if origin != MAIN and (origin not in ablations or "replicate_of" in ablations[origin] or origin == name):
        raise ValueError(f"ablation {name!r}: replicate_of {origin!r}: give {MAIN!r} or the name of another ablation "
                         "that is not itself a replicate")
    base = {} if origin == MAIN else ablations[origin]

    def shared(s: dict) -> dict:
        out = {k: s.get(k, default) for k, default in REPLICATE_SHARED.items()}
        out["options"] = {k: v for k, v in (out["options"] or {}).items() if k != "seed"}
        return out

    mine, theirs = shared(spec), shared(base)
    differ = sorted(k for k in REPLICATE_SHARED if mine[k] != theirs[k])
    if differ:
        raise ValueError(f"ablation {name!r} replicates {origin!r} but differs from it in {differ}: a replicate trains "
                         "exactly as its original apart from options.seed (copy its other keys)")
    default = build_parser().get_default("seed")
    seeds = lambda s: [{**common, **flags}.get("seed", default)  # noqa: E731
                       for stage, flags in variant_stages(stages, s).items() if stage in HALO_STAGES]
    same = [a for a, b in zip(seeds(spec), seeds(base)) if a == b]
    if same or "seed" not in (spec.get("options") or {}):
        raise ValueError(f"ablation {name!r} replicates {origin!r} on its seed ({same[0] if same else default}): give "
                         f"options.seed another value, so that it trains on other batches")


def variant_stages(stages: dict, spec: dict) -> dict:
    """The recipe's `stages` as an ablation trains them: their train_iters times its `budget_scale`, its `options`
    over every stage, its per-stage flags (its `stages` key) over those (the variant's own train_iters as given)."""
    options, per_stage, scale = spec.get("options") or {}, spec.get("stages", {}), spec.get("budget_scale", 1)
    return {name: {**scaled_stage(flags, scale), **options, **per_stage.get(name, {})}
            for name, flags in stages.items()}


def scaled_stage(options: dict, scale: float) -> dict:
    """A stage's options with its `train_iters` multiplied by `scale` (at least one iteration)."""
    if scale == 1 or "train_iters" not in options:
        return options
    return {**options, "train_iters": max(1, round(options["train_iters"] * scale))}


def read_metrics(save_dir: str) -> list:
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def stage_tokens(save_dir: str, rows: list) -> int:
    """Training tokens of a finished stage (`rows`: its metrics.jsonl): consumed samples (iterations x global
    batch) x its sequence length."""
    if not rows:
        return 0
    with open(os.path.join(save_dir, "config.yaml")) as f:  # the stage's resolved flags
        seq_length = yaml.safe_load(f)["seq_length"]
    return rows[-1]["consumed_samples"] * seq_length


class _Runner:
    """Runs a recipe's stages, recording each one's command, tokens, speed and loss curve."""

    def __init__(self, work: str, common: dict):
        self.work, self.common = work, common
        self.results, self.commands, self.tokens, self.tokens_per_s, self.curves = {}, [], {}, {}, {}

    def ck(self, name: str) -> str:
        return os.path.join(self.work, "checkpoints", name)

    def records(self) -> dict:
        """What the report takes from the stages run so far (a worker process hands them to the parent)."""
        return {"commands": self.commands, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
                "curves": self.curves}

    def merge(self, records: dict) -> None:
        self.commands += records["commands"]
        for key in ("tokens", "tokens_per_s", "curves"):
            getattr(self, key).update(records[key])

    def __call__(self, key: str, stage: str, options: dict) -> dict:
        options = {**self.common, **options}
        self.commands.append(stage_command(stage, options))
        result = self.results[key] = run_stage(stage, options)
        if result.get("preempted"):
            raise Preempted(f"{key} stopped at iteration {result['iterations']} of {options.get('train_iters')}")
        if stage != "select":
            rows = read_metrics(options["save"])
            self.tokens[key] = stage_tokens(options["save"], rows)
            self.tokens_per_s[key] = _mean_tokens_per_s(rows)
            self.curves[key] = [[r["iteration"], r["loss"]] for r in rows]
        return result


def run_recipe(path: str, work_dir: str = None, command: Optional[str] = None, sets=(),
               ablations: Optional[str] = None) -> dict:
    """Runs the recipe (with `apply_overrides`' changes) and returns its report; after a pre-emption, {"preempted":
    <which stage, where>} (the caller exits 0, as a pre-empted pretrain_hypenet.py does, and re-running continues)."""
    if command is None:  # the tools/halo.py command line of this call
        command = shlex.join(["python", "tools/halo.py", "--recipe", path,
                              *(["--work-dir", work_dir] if work_dir else []),
                              *(x for item in sets for x in ("--set", item)),
                              *(["--ablations", ablations] if ablations is not None else [])])
    recipe = apply_overrides(load_recipe(path), sets, ablations)  # a bad --set fails before any process starts
    try:
        return _run_recipe(recipe, work_dir, command)
    except Preempted as stop:
        log.warning("recipe pre-empted: %s, after its checkpoint; re-run the same command to continue", stop)
        return {"preempted": str(stop)}


def _changed_keys(before, after, prefix: str = "") -> List[str]:
    """The dotted keys whose values differ, at the first level where they do (a removed ablation is one key)."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [] if before == after else [prefix.rstrip(".")]
    missing = object()
    return [k for key in {**before, **after}
            for k in _changed_keys(before.get(key, missing), after.get(key, missing), f"{prefix}{key}.")]


def _record_recipe(work: str, recipe: dict) -> None:
    """Writes <work>/recipe.yaml, what this run trains (the file, its base and the overrides). Re-running a work folder
    with another recipe continues it: finished stages keep what they were trained with. So the recipe it replaces is
    kept as recipe.<n>.yaml and the changed keys are logged, not lost."""
    path = os.path.join(work, "recipe.yaml")
    if os.path.exists(path):
        with open(path) as f:
            before = yaml.safe_load(f)
        if before != recipe:
            changed = _changed_keys(before, recipe)
            n = 1
            while os.path.exists(os.path.join(work, f"recipe.{n}.yaml")):
                n += 1
            os.replace(path, os.path.join(work, f"recipe.{n}.yaml"))
            log.warning("%s: continuing a run with another recipe (changed: %s); stages already finished keep the "
                        "earlier values, kept in recipe.%d.yaml", work, ", ".join(changed), n)
    with replaced_atomically(path) as f:
        yaml.safe_dump(recipe, f, sort_keys=False)


def _run_recipe(recipe: dict, work_dir: Optional[str], command: str) -> dict:
    from megatron_hypenet.checkpoint import start_save_helper

    start_save_helper()  # before the teacher's conversion saves: a pre-empted stage's final save needs it alive
    work = work_dir or recipe.get("work_dir", os.path.join("runs", recipe.get("name", "recipe")))
    os.makedirs(work, exist_ok=True)
    _record_recipe(work, recipe)
    ablations = recipe.get("ablations") or {}
    check_ablations(ablations, recipe.get("stages", {}), recipe.get("common", {}))
    workers = recipe.get("ablation_workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"ablation_workers: {workers!r}; give the number of ablations to train at once (1: one "
                         "after another in this process)")
    if workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("ablation_workers > 1 trains the ablations as one-process jobs beside each other: launch the "
                         "recipe with plain python, or set ablation_workers: 1 under torchrun")
    t_start = time.time()
    teacher_hf, prefix = _prepare_teacher_and_data(recipe, work)
    heldout = local_corpus_paths(work)["heldout"] if "local_corpus" in recipe.get("data", {}) else None
    if recipe.get("eval", {}).get("long_loss_windows"):  # too little held-out text fails now, not after training
        from transformers import AutoTokenizer

        _long_loss_windows(recipe, heldout, AutoTokenizer.from_pretrained(teacher_hf))

    from megatron_hypenet.convert import hf_to_mcore

    run = _Runner(work, dict(recipe.get("common", {}), data_path=prefix, tokenizer=teacher_hf))
    run.commands += data_commands(recipe, work, teacher_hf, prefix)
    ck = run.ck
    if not os.path.exists(os.path.join(ck("teacher_init"), "latest_checkpointed_iteration.txt")):
        hf_to_mcore(teacher_hf, ck("teacher_init"))
    stages = recipe.get("stages", {})
    teacher = ck("teacher_init")
    if "pretrain" in stages:
        run("pretrain", "pretrain", {"load": teacher, "save": ck("teacher"), **stages["pretrain"]})
        teacher = ck("teacher")
    with _ablation_pool(ablations, workers) as pool, ThreadPoolExecutor(max(1, len(ablations))) as waiting:
        # with workers, a variant's own align needs only the teacher: it starts now, beside the main align
        aligns = {} if pool is None else {
            name: pool.submit(_ablation_worker, work, run.common, {}, name, spec, stages, teacher, None, workers)
            for name, spec in ablations.items() if not spec.get("reuse_align")}
        run("align", "align", {"teacher": teacher, "save": ck("align"), **stages.get("align", {})})
        if "select" in stages:
            # a teacher trained on real text is scored on haystacks of its held-out files, not on synthetic prose
            haystack = ({"select_haystack": local_corpus_paths(work)["heldout"]}
                        if "local_corpus" in recipe.get("data", {}) else {})
            run("select", "select", {"teacher": teacher, "load": ck("align"), "save": ck("select"), **haystack,
                                     **stages["select"]})
            pattern = run.results["select"]["layer_pattern"]
        else:  # a fixed pattern instead of the selection sweep
            pattern = fixed_pattern(stages)
        # the rest of a variant needs its align and the pattern: with workers it trains beside the main student
        futures = {} if pool is None else {
            name: waiting.submit(_after, aligns.get(name), pool, _ablation_worker, work, run.common, dict(run.tokens),
                                 name, spec, stages, teacher, pattern, workers)
            for name, spec in ablations.items()}
        run("distill", "distill", {"teacher": teacher, "load": ck("align"), **stages.get("distill", {}),
                                   "layer_pattern": pattern, "save": ck("distill")})
        final = ck("distill")
        if "finetune" in stages:
            run("finetune", "finetune", {"load": ck("distill"), "save": ck("finetune"), **stages["finetune"]})
            final = ck("finetune")

        exports = {TEACHER: os.path.join(work, "hf_teacher"), STUDENT: os.path.join(work, "hf_student")}
        for src, name in ((teacher, TEACHER), (final, STUDENT)):
            export(run, src, exports[name])
        variants = {}
        for name, spec in ablations.items():
            if pool is None:
                variants[name], folder = run_ablation_and_export(run, name, spec, stages, teacher, pattern)
            else:
                try:
                    variants[name], folder, records = futures[name].result()
                    run.merge(records)
                except Exception as err:  # noqa: BLE001  (its process died: the others' results still count)
                    variants[name], folder = _failed_ablation(name, spec, err), None
            if folder:
                exports[name] = folder

    now = datetime.datetime.now(datetime.timezone.utc)
    report = {"name": recipe.get("name", "recipe"), "command": command, "device": device_name(),
              "date": now.isoformat(timespec="seconds"),
              "train_length": recipe["common"]["seq_length"], "layer_pattern": pattern,
              **evaluate_exports(recipe, exports, prefix, heldout),
              "tokens_per_s": run.tokens_per_s, "tokens": run.tokens, "halo_budget": halo_budget(run.tokens),
              "ablation_workers": workers,
              "ablations": variants,
              "selection": ({k: run.results["select"][k] for k in ("attention_layers", "teacher_recall", "layers")}
                            if "select" in run.results else None)}
    for name, error in report.pop("eval_errors").items():  # a variant that exported but did not evaluate
        variants[name]["error"] = error
        exports.pop(name)
    report["decode"] = _decode_report(recipe, report, exports)
    if heldout:
        report["corpus"] = _corpus_report(work, prefix)
    report.update(exports=exports, commands=run.commands, loss_curves=run.curves, minutes=(time.time() - t_start) / 60)
    write_report(report, work, pages=bool(ablations or heldout))
    print(format_report(report))
    return report


def write_report(report: dict, work: str, pages: bool) -> None:
    """<work>/report.json, and with `pages` the results page: <work>/results.md beside <work>/results/ (its
    plots and copies of report.json and recipe.yaml: one flat folder of small files, easy to bring back from a GPU
    machine)."""
    paths = [os.path.join(work, "report.json")]
    if pages:
        os.makedirs(os.path.join(work, "results"), exist_ok=True)
        paths.append(os.path.join(work, "results", "report.json"))
        shutil.copy(os.path.join(work, "recipe.yaml"), os.path.join(work, "results", "recipe.yaml"))  # _run_recipe's
    for path in paths:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    if pages:
        from tools.write_results import write_results

        write_results(report, os.path.join(work, "results.md"))


def _decode_report(recipe: dict, report: dict, exports: dict) -> dict:
    longest = report["train_length"] * max(report["multipliers"])
    try:
        return decode_speed({TEACHER: exports[TEACHER], STUDENT: exports[STUDENT]}, longest, report["train_length"],
                            recipe.get("eval", {}).get("decode_compile", "none"))
    except Exception as err:  # noqa: BLE001  (the timing comes last: keep everything measured before it)
        log.exception("decode speed failed")
        return {"length": longest, "error": f"{type(err).__name__}: {err}"}


def _corpus_report(work: str, prefix: str) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with open(local_corpus_paths(work)["stats"]) as f:
        corpus = json.load(f)
    indexed = IndexedDataset(prefix)  # (its sequence lengths are a view of the index, closed with it)
    corpus["train_tokens"] = int(indexed.sequence_lengths.sum())
    del indexed
    return corpus


def export(run: _Runner, checkpoint: str, out: str) -> None:
    from megatron_hypenet.convert import mcore_to_hf

    run.commands.append(f"python tools/convert_mcore_to_hf.py --mcore-dir {checkpoint} --out {out} --overwrite")
    mcore_to_hf(checkpoint, out, overwrite=True)


def ablation_align(run: _Runner, name: str, spec: dict, stages: dict, teacher: str) -> str:
    """The variant's align checkpoint: the main run's, or its own (trained here unless already complete).
    `stages`: the variant's (`variant_stages`)."""
    if spec.get("reuse_align"):
        return run.ck("align")
    align = run.ck(os.path.join(name, "align"))
    run(f"{name}/align", "align", {"teacher": teacher, "save": align, **stages.get("align", {})})
    return align


def run_ablation(run: _Runner, name: str, spec: dict, stages: dict, teacher: str, selected: str) -> dict:
    """One student variant: (align,) distill, finetune, with the variant's options on each stage."""
    stages, reuse_align = variant_stages(stages, spec), bool(spec.get("reuse_align"))
    ck = lambda stage: run.ck(os.path.join(name, stage))  # noqa: E731
    align = ablation_align(run, name, spec, stages, teacher)
    pattern = ablation_pattern(spec, selected, _main_selection(run))
    # the variant's pattern wins over a fixed `stages.distill.layer_pattern` of the main run
    run(f"{name}/distill", "distill", {"teacher": teacher, "load": align, **stages.get("distill", {}),
                                       "layer_pattern": pattern, "save": ck("distill")})
    final = ck("distill")
    if "finetune" in stages:
        run(f"{name}/finetune", "finetune", {"load": final, "save": ck("finetune"), **stages["finetune"]})
        final = ck("finetune")
    return {"kind": spec.get("kind"), "options": spec.get("options") or {}, "stages": spec.get("stages", {}),
            "reused_align": reuse_align, "layer_pattern": pattern, "checkpoint": final,
            "budget_scale": spec.get("budget_scale", 1), "replicate_of": spec.get("replicate_of"),
            "halo_tokens": variant_halo_tokens(run.tokens, name, reuse_align),
            "same_attention_layers_as_main": _attention_layers(pattern) == _attention_layers(selected)}


def _main_selection(run: _Runner) -> Optional[dict]:
    """The main run's selection sweep (select stage's selection.json), if the recipe ran one."""
    from megatron_hypenet.halo.select import SELECTION_FILE

    path = os.path.join(run.ck("select"), SELECTION_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_ablation_and_export(run: _Runner, name: str, spec: dict, stages: dict, teacher: str, selected: str) -> tuple:
    """(the variant's record, its HF folder): the folder is None when it failed, which the report records and
    goes on without (one failed experiment must not lose the others' results)."""
    try:
        variant = run_ablation(run, name, spec, stages, teacher, selected)
        folder = os.path.join(run.work, f"hf_{name}")
        export(run, variant.pop("checkpoint"), folder)
        return variant, folder
    except Exception as err:  # noqa: BLE001
        return _failed_ablation(name, spec, err), None


def _failed_ablation(name: str, spec: dict, err: Exception) -> dict:
    log.error("ablation %s failed; the report goes on without it", name, exc_info=err)
    return {"kind": spec.get("kind"), "options": spec.get("options") or {}, "stages": spec.get("stages", {}),
            "replicate_of": spec.get("replicate_of"), "error": f"{type(err).__name__}: {err}"}


@contextlib.contextmanager
def _ablation_pool(ablations: dict, workers: int):
    """A process pool for `ablation_workers` > 1 (None otherwise). Small students leave the GPU idle while
    the host launches their kernels, so several trained at once share it; each in its own process, since
    megatron-core's parallel state is per process. Leaving the block waits for the workers."""
    if not ablations or workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _after(first, pool, fn, *args):
    """fn(*args) in `pool` once the future `first` (or None) has finished; `first`'s error is the result's."""
    if first is not None:
        first.result()
    return pool.submit(fn, *args).result()


def tag_worker_logs(name: str) -> None:
    """Prefix this process's log lines with the variant's name. A pool process trains one variant after
    another, so the handler is replaced each time (run 10 logged rope_everywhere as the align worker's
    nope_everywhere)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s [{name}]: %(message)s",
                        force=True)


def _ablation_worker(work: str, common: dict, tokens: dict, name: str, spec: dict, stages: dict, teacher: str,
                     selected: Optional[str], workers: int) -> tuple:
    """`run_ablation_and_export` in a worker process: its own one-process group on a free port, its own
    checkpoint save helper and a share of the CPU threads. `tokens`: the stages' tokens so far (a variant
    reusing the main align counts its tokens). Returns the variant, its folder and what its stages
    recorded, for the parent's report; with `selected` None only the variant's own align (the variant's
    later worker finds it complete and records it)."""
    from megatron_hypenet.parallel import PROCESS_GROUP_ENV

    for key in PROCESS_GROUP_ENV:
        os.environ.pop(key, None)  # the parent's one-process group, inherited through the environment
    tag_worker_logs(name)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (workers + 1)))
    from megatron_hypenet.checkpoint import start_save_helper

    start_save_helper()
    run = _Runner(work, common)
    run.tokens.update(tokens)
    if selected is None:
        ablation_align(run, name, spec, variant_stages(stages, spec), teacher)
        return None
    variant, folder = run_ablation_and_export(run, name, spec, stages, teacher, selected)
    return variant, folder, run.records()


def _attention_layers(pattern: str) -> list:
    return [i for i, c in enumerate(pattern) if c == "A"]


def variant_halo_tokens(tokens: dict, name: str, reused_align: bool) -> int:
    """An ablation's HALO training tokens: its own stages, and the main run's align where it reused that."""
    own = sum(tokens.get(f"{name}/{stage}", 0) for stage in HALO_STAGES)
    return own + (tokens.get("align", 0) if reused_align else 0)


def halo_budget(tokens: dict) -> dict:
    """The main run's HALO training tokens against the teacher's (select trains nothing)."""
    halo = sum(tokens.get(stage, 0) for stage in HALO_STAGES)
    teacher = tokens.get("pretrain")
    return {"halo_tokens": halo, "teacher_tokens": teacher,
            "percent_of_teacher": 100.0 * halo / teacher if teacher else None}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


def _mean_tokens_per_s(rows: list) -> float:
    rows = rows[1:] or rows  # the first step pays one-off start-up costs
    return sum(r["tokens_per_s"] for r in rows) / len(rows) if rows else float("nan")


def _loss_batches(recipe: dict, prefix: str, heldout: Optional[str], tok, batch_size: int) -> list:
    """Held-out token batches: windows of the held-out files (local corpus), else the data's valid split."""
    ev = recipe.get("eval", {})
    train_len, samples = recipe["common"]["seq_length"], ev.get("loss_samples", 16)
    if heldout:
        from tools.eval_long_context import read_texts, token_windows

        windows = token_windows(tok, read_texts(heldout), train_len + 1, samples)
        if not windows:
            raise ValueError(f"{heldout} holds fewer than {train_len + 1} tokens: raise max_bytes or heldout_fraction")
        return [torch.tensor(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
    from megatron_hypenet.data import build_gpt_datasets, make_dataloader

    _, valid, _ = build_gpt_datasets(prefix, train_len, 1234, 1, valid_samples=samples,
                                     eod_id=tok.eos_token_id, split=recipe["common"].get("split", "98,2,0"))
    # megatron-core builds whole epochs of the split: take only the samples asked for
    return list(itertools.islice(make_dataloader(valid, batch_size, 0, 0), math.ceil(samples / batch_size)))


def _long_loss_windows(recipe: dict, heldout: Optional[str], tok) -> Optional[tuple]:
    """(windows, buckets) of `eval.long_loss_windows`: held-out windows as long as the longest prompt and the
    position buckets [0, m1 N), [m1 N, m2 N), ... of the multipliers; None when the recipe asks for none."""
    from tools.eval_long_context import bucket_bounds, read_texts, token_windows

    ev = recipe.get("eval", {})
    num = ev.get("long_loss_windows", 0)
    if not num:
        return None
    if not heldout:
        raise ValueError("eval.long_loss_windows scores held-out files: the recipe needs data.local_corpus")
    train_len, multipliers = recipe["common"]["seq_length"], ev.get("needle_multipliers", [1, 4])
    length = train_len * max(multipliers)  # predicted positions 1 .. length - 1: every one falls in a bucket
    windows = token_windows(tok, read_texts(heldout), length, num)
    if len(windows) < num:
        raise ValueError(f"eval.long_loss_windows {num}: the held-out files hold only {len(windows)} windows of "
                         f"{length} tokens; lower it or raise data.local_corpus's max_bytes or heldout_fraction")
    return windows, bucket_bounds(train_len, sorted(multipliers))


def evaluate_exports(recipe: dict, exports: dict, prefix: str, heldout: Optional[str] = None) -> dict:
    """Loads each exported HF folder with transformers (bf16 on GPU, fp32 on CPU) and scores it on held-out
    data (loss at the training length, and by position over longer windows when the recipe asks) and
    retrieval (exact match at each length); every model sees the same prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_hypenet.retrieval import (
        TextFiller,
        lm_loss,
        make_needle_examples,
        make_passkey_examples,
        retrieval_accuracy,
    )
    from tools.eval_long_context import evaluate_perplexity

    ev = recipe.get("eval", {})
    train_len = recipe["common"]["seq_length"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(exports[TEACHER])
    batch_tokens = ev.get("batch_tokens", 4 * train_len)
    batches = _loss_batches(recipe, prefix, heldout, tok, max(1, batch_tokens // train_len))
    tasks, multipliers = ev.get("tasks", ["needle"]), ev.get("needle_multipliers", [1, 4])
    num = ev.get("needle_examples", 20)
    makers = {"needle": make_needle_examples, "passkey": make_passkey_examples}
    if set(tasks) - set(makers):
        raise ValueError(f"eval.tasks {tasks}: known tasks are {sorted(makers)}")
    filler = TextFiller.from_jsonl(heldout) if heldout else None
    extra = {"filler": filler} if filler else {}
    examples = {(task, m): makers[task](tok, train_len * m, num, seed=7, **extra)
                for task in tasks for m in multipliers}
    long_loss = _long_loss_windows(recipe, heldout, tok)
    window_loss = {}  # model -> per window, its loss in each position bucket
    models, parameters, errors = {}, {}, {}
    for name, folder in exports.items():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
            logits_fn = lambda ids: model(input_ids=ids.to(device), use_cache=False).logits  # noqa: E731
            parameters[name] = sum(p.numel() for p in model.parameters())  # tied embeddings once
            row = {"valid_loss": lm_loss(logits_fn, batches)}
            for (task, m), prompts in examples.items():
                row[f"{task}@{m}x"], _ = retrieval_accuracy(logits_fn, prompts, max(1, batch_tokens // (train_len * m)))
            if long_loss:
                windows, buckets = long_loss  # HypeNet prefills in chunks of the training length, as in decoding
                ppl = evaluate_perplexity(model, windows, buckets, train_len)
                row.update({f"loss@{hi // train_len}x": x for (_, hi), x in zip(buckets, ppl["nll"])})
                window_loss[name] = ppl["window_nll"]
            models[name] = row
            log.info("evaluated %s: %s", name, row)
        except Exception as err:  # noqa: BLE001  (an ablation's failure is reported; the main models' is fatal)
            if name in (TEACHER, STUDENT):
                raise
            log.exception("evaluating %s failed; the report goes on without it", name)
            errors[name] = f"evaluation: {type(err).__name__}: {err}"
        model = logits_fn = None  # free this model before the next one loads
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"models": models, "parameters": parameters, "eval_errors": errors, "tasks": tasks, "multipliers": multipliers,
            "needle_examples": num,
            "long_loss": ({"windows": len(long_loss[0]), "window_tokens": len(long_loss[0][0]),
                           "multipliers": [hi // train_len for _, hi in long_loss[1]], "window_loss": window_loss}
                          if long_loss else None),
            "loss_tokens": sum(int(b["loss_mask"].sum()) if isinstance(b, dict) else b[:, 1:].numel() for b in batches),
            "haystack": "held-out files of the local corpus" if heldout else "synthetic corpus prose",
            "eval_dtype": str(dtype).replace("torch.", ""), "eval_device": device.type}


def decode_speed(exports: dict, length: int, chunk: int, backend: str = "none", device: Optional[str] = None) -> dict:
    """Time per output token at `length` tokens of context for each HF folder, with tools/bench_inference.py's
    harness (chunked prefill, then one decode step captured in a CUDA graph), bf16. Skipped without a GPU
    unless `device` is given (a CPU run checks the wiring, in fp32; its times mean nothing)."""
    if device is None and not torch.cuda.is_available():
        log.info("decode speed: skipped (no CUDA device; tools/bench_inference.py times decoding on GPUs only)")
        return {"skipped": "no CUDA device", "length": length}
    from transformers import Qwen3ForCausalLM

    from megatron_hypenet.hf.modeling_hypenet import HypeNetForCausalLM
    from tools.bench_inference import check_against_hf, measure, qwen3_as_hypenet

    device = torch.device(device or "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"length": length, "prefill_chunk": chunk, "compile": backend}
    for name, folder in exports.items():
        with open(os.path.join(folder, "config.json")) as f:
            qwen = json.load(f)["model_type"] == "qwen3"
        cls = Qwen3ForCausalLM if qwen else HypeNetForCausalLM  # (the package's HypeNet class: the harness's cache)
        reference = cls.from_pretrained(folder, dtype=dtype).to(device).eval()
        model = qwen3_as_hypenet(reference) if qwen else reference  # both through the same decode code
        check = check_against_hf(model, reference, device, 64, backend)
        if not check <= DECODE_CHECK_TOLERANCE:  # (NaN fails too) timing a step that computes the wrong model
            raise RuntimeError(f"decode speed: {name}'s benchmark step disagrees with its HF model (relative L2 "
                               f"{check:.2e} > {DECODE_CHECK_TOLERANCE}); not timing it")
        measure(model, min(length, 2 * chunk), chunk, device, backend)  # first-use compilation outside the timing
        out[name] = {**measure(model, length, chunk, device, backend), "logits_check": check}
        log.info("decode speed %s @ %d: %s", name, length, out[name])
        del model, reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def format_report(report: dict) -> str:
    models = report["models"]
    cols = list(next(iter(models.values())))
    name_width = max(20, max(map(len, models)) + 2)
    lines = ["", f"HALO summary (training length {report['train_length']} tokens, "
                 f"student layer pattern {report['layer_pattern']}; task@Mx: exact-match accuracy on "
                 f"{report['needle_examples']} held-out prompts of M x {report['train_length']} tokens)",
             f"{'model':<{name_width}}" + "".join(f"{c:>14}" for c in cols)]
    for name, row in models.items():
        lines.append(f"{name:<{name_width}}" + "".join(f"{row[c]:>14.4f}" for c in cols))
    lines.append("training tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in report["tokens_per_s"].items()))
    budget = report.get("halo_budget", {})
    if budget.get("percent_of_teacher") is not None:
        lines.append(f"HALO tokens: {budget['halo_tokens']:,} = {budget['percent_of_teacher']:.2f}% of the "
                     f"teacher's {budget['teacher_tokens']:,}")
    lines.append("HF exports: " + " , ".join(report["exports"].values()))
    lines.append(f"total time: {report.get('minutes', float('nan')):.1f} min")
    return "\n".join(lines)

