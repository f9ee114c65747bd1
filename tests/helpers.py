"""Shared test fixtures: tiny local models and a torchrun launcher (no downloads anywhere)."""

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


def worker(nproc: int, mode: str, ckpt: str, out: str, tp: int, cp: int = 1) -> dict:
    torchrun(nproc, WORKER, mode, ckpt, out, tp, cp)
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
    from kernels.lightning import chunk, fused_recurrent

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(chunk, "_empty", nan_empty)
    monkeypatch.setattr(fused_recurrent, "_empty", nan_empty)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf never passes."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite (unwritten or overflowed) elements"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
