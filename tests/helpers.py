"""Shared test fixtures: tiny local models and a torchrun launcher (no downloads anywhere)."""

import hashlib
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")


def torchrun(nproc: int, script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `script` under torchrun with gloo on CPU; raises with its output if it fails."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           script, *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def worker(nproc: int, mode: str, ckpt: str, out: str, tp: int, cp: int = 1, sp: bool = False) -> dict:
    torchrun(nproc, WORKER, mode, ckpt, out, tp, cp, int(sp))
    return torch.load(out, weights_only=False)


def perturb_norms(model, std: float = 0.2, seed: int = 0) -> None:
    """Norm weights at 1 and identity convs would hide layout mistakes; make them random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "conv" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def poison_kernel_buffers(monkeypatch) -> None:
    """Kernel outputs start as NaN, so an element a kernel never writes fails the check."""
    from kernels import triton_utils

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_utils, "empty", nan_empty)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf never passes."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite (unwritten or overflowed) elements"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_fwd_bwd(outs, ref_outs, leaves, ref_leaves, names, tol, generator) -> None:
    """Outputs against their float64 references, then, for the same random cotangents (drawn with generator,
    rounded to each output's dtype), the gradients of leaves against those of ref_leaves: every relative
    error below tol."""
    for i, (o, ro) in enumerate(zip(outs, ref_outs)):
        assert rel_err(o, ro) < tol, f"output {i}"
    cots = [torch.randn(o.shape, generator=generator, device=o.device, dtype=torch.float64).to(o.dtype)
            for o in outs]
    torch.autograd.backward(list(outs), cots)
    torch.autograd.backward(list(ref_outs), [c.double() for c in cots])
    for name, x, rx in zip(names, leaves, ref_leaves):
        assert rel_err(x.grad, rx.grad) < tol, name


def gated_delta_in_pieces(q, k, v, g, beta, scale, pieces: int):
    """The Gated DeltaNet op over `pieces` consecutive pieces of the sequence, each run on its own from zero
    and joined as context parallel ranks join them (gated_delta_rule_affine, entering_state), in one
    process: (o, final state), to compare with one run over the whole sequence."""
    from kernels.gated_delta import entering_state, gated_delta_rule_affine

    runs = [gated_delta_rule_affine(*(x.chunk(pieces, 1)[i] for x in (q, k, v, g, beta)), scale)
            for i in range(pieces)]
    S0, M = (torch.stack([run[i] for run in runs]) for i in (2, 3))
    outs = []
    for i, (o0, q_m, _, _) in enumerate(runs):
        outs.append(o0 + torch.einsum("bthk,bhkv->bthv", q_m, entering_state(S0, M, i)))
    return torch.cat(outs, 1).to(v.dtype), entering_state(S0, M, pieces)


def make_distill_work(root, pattern: str = "ALLA"):
    """A tiny teacher with tied embeddings, a `pattern` student initialised from it (which `--stage distill
    --load <root>/hybrid` loads as is), a tokenizer and preprocessed data, all under `root`."""
    from transformers import AutoTokenizer

    from megatron_hypenet import checkpoint, parallel
    from megatron_hypenet.arguments import parse_args
    from megatron_hypenet.config import model_description, read_model_description
    from megatron_hypenet.convert import hf_to_mcore
    from megatron_hypenet.corpus import generate_corpus
    from megatron_hypenet.halo.init import init_student_from_teacher
    from megatron_hypenet.halo.stages import build_from_description
    from megatron_hypenet.tiny import save_random_qwen3
    from tools.preprocess_data import preprocess
    from tools.train_tokenizer import train_tokenizer

    corpus = generate_corpus(str(root / "corpus.jsonl"), num_docs=150, seed=0, doc_tokens_hint=200)
    train_tokenizer([corpus], vocab_size=300, out_dir=str(root / "tokenizer"))
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    hf = save_random_qwen3(str(root / "hf"), seed=0, tokenizer_dir=str(root / "tokenizer"), vocab_size=len(tok),
                           eos_token_id=tok.eos_token_id, tie=True)
    preprocess([corpus], hf, str(root / "data" / "corpus"), append_eod=True)
    parallel.initialize(1, 1)
    hf_to_mcore(hf, str(root / "teacher"))
    t_desc = read_model_description(checkpoint.resolve(str(root / "teacher")))
    args = parse_args(["--stage", "distill", "--teacher", str(root / "teacher"), "--data-path", "x"])
    teacher, _ = build_from_description(t_desc, args, teacher=True)
    checkpoint.load_checkpoint(str(root / "teacher"), teacher, t_desc, load_state=False)
    student, _ = build_from_description(t_desc, args, layer_pattern=pattern, attention_rope=False)
    init_student_from_teacher(student, teacher)
    desc = model_description(student.config, t_desc["vocab_size"], True, t_desc["hf_extra"])
    checkpoint.save_checkpoint(str(root / "hybrid"), 0, student, desc)
    return root


def distill_flags(work, save, pattern: str = "ALLA", *extra) -> list:
    """pretrain_hypenet.py flags of a short distill run on `make_distill_work`'s folder."""
    return ["--stage", "distill", "--teacher", work / "teacher", "--load", work / "hybrid", "--layer-pattern", pattern,
            "--data-path", work / "data" / "corpus", "--tokenizer", work / "hf", "--seq-length", 64,
            "--micro-batch-size", 2, "--global-batch-size", 8, "--split", "90,10,0", "--train-iters", 5,
            "--lr", 3e-3, "--lr-warmup-iters", 2, "--lr-decay-style", "constant", "--clip-grad", 0.05,
            "--save-interval", 3, "--no-progress", "--save", save, *extra]


def metrics(save) -> list:
    import json

    return [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]


def build_from_desc(desc: dict, **overrides):
    """A one-process megatron model for a model description (config overrides on top)."""
    from megatron_hypenet import parallel
    from megatron_hypenet.config import config_from_description
    from megatron_hypenet.model import build_model

    parallel.initialize(1, 1)
    return build_model(config_from_description(desc, **overrides), desc["vocab_size"], desc["tie_word_embeddings"])


def load_model(root):
    """(model in eval mode, description) of the latest checkpoint in `root`."""
    from megatron_hypenet import checkpoint
    from megatron_hypenet.config import read_model_description

    desc = read_model_description(checkpoint.resolve(root))
    model = build_from_desc(desc)
    checkpoint.load_checkpoint(root, model, desc, load_state=False)
    return model.eval(), desc


def model_logits(model, x):
    from megatron_hypenet.halo.stages import forward_hidden
    from megatron_hypenet.losses import full_logits

    return full_logits(model, forward_hidden(model, x))


def megatron_greedy(model, prompt, steps: int):
    """Greedy decoding with the Megatron forward over the whole sequence each step (no cache): what an
    exported model's cached generate() must reproduce."""
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model_logits(model, seq)[:, -1:].argmax(-1)], 1)
    return seq


def check_hf_export(root: str, out: str, prompt, new_tokens: int):
    """Exports the Megatron checkpoint `root` to the HF folder `out` and checks the folder against it: logits
    within 1e-4 and a cached greedy generate() equal to megatron_greedy. Returns the loaded HF model."""
    from transformers import AutoModelForCausalLM

    from megatron_hypenet.convert import mcore_to_hf

    mcore_to_hf(root, out, overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    model, _ = load_model(root)
    with torch.no_grad():
        assert (hf(prompt).logits - model_logits(model, prompt)).abs().max() <= 1e-4
        generated = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, megatron_greedy(model, prompt, new_tokens))
    return hf


def folder_hash(path):
    """sha256 of a folder's tree: names and file bytes (a refused resume must leave a checkpoint as it was)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        h.update(os.path.relpath(dirpath, path).encode())
        for name in sorted(filenames):
            h.update(name.encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()
