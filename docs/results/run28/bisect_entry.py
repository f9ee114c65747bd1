"""pretrain_hypenet.main with arguments.py's refusal of Muon + --cuda-graph + --compile lifted, and the
debugging patches named in BISECT_MODE (a comma list), for repro_crash.py's bisect sets. A record, not a tool:
- sync: a device sync after the graph replay, after the clipping and after each optimizer part; a fault then
  prints the segment it surfaced in ('BISECT FAULT ... in segment ending ...');
- clone_grads: Muon steps on contiguous copies of the gradients, not on the buffers the CUDA graph writes;
- mixer_muon: Muon only on the token mixers' matrices, the other matrices on AdamW;
- clear_ws: every cached cuBLAS workspace dropped once the step is captured;
- opt_stream: the optimizer step on its own CUDA stream (so its own cuBLAS workspace).
At step 1 it prints each optimizer gradient that is not laid out like its parameter ('BISECT odd grad')."""
import argparse, os, sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

MODES = set(filter(None, os.environ.get("BISECT_MODE", "").split(",")))
_error = argparse.ArgumentParser.error


def _error_unless_refusal(self, message):
    if message.startswith("--optimizer muon with --cuda-graph"):
        print("BISECT: refusal lifted", flush=True)
        return
    _error(self, message)


argparse.ArgumentParser.error = _error_unless_refusal

from megatron_hypenet import optimizer as opt, training  # noqa: E402

STEP = [0]


def _sync(where):
    if not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:
        print(f"BISECT FAULT at step {STEP[0]} in segment ending '{where}': {e!r}"[:400], flush=True)
        raise


if "sync" in MODES:
    _clip = training.clip_grad_norm

    def clip(params, max_norm):
        STEP[0] += 1
        _sync("graph replay (before clip)")
        norm = _clip(params, max_norm)
        _sync("clip")
        return norm

    training.clip_grad_norm = clip


def _describe(part_name, part):
    for g in part.param_groups:
        for p in g["params"]:
            gr = p.grad
            if gr is None:
                print(f"BISECT grad {part_name} shape {tuple(p.shape)} grad None", flush=True)
                continue
            odd = (not gr.is_contiguous()) or gr._base is not None or gr.storage_offset() != 0 \
                or gr.untyped_storage().nbytes() != gr.numel() * gr.element_size() or gr.dtype != p.dtype \
                or gr.stride() != p.stride()
            if odd:
                print(f"BISECT odd grad {part_name} shape {tuple(p.shape)} stride {gr.stride()} p.stride {p.stride()} "
                      f"contig {gr.is_contiguous()} base {gr._base is not None} off {gr.storage_offset()} "
                      f"storage {gr.untyped_storage().nbytes()} need {gr.numel() * gr.element_size()} "
                      f"dtype {gr.dtype}/{p.dtype} ptr%256 {gr.data_ptr() % 256}", flush=True)


def step(self):
    if "sync" not in MODES:
        STEP[0] += 1
    if STEP[0] == 1:
        n = sum(len(g["params"]) for part in self.parts.values() for g in part.param_groups)
        print(f"BISECT step 1: {n} params in {list(self.parts)}", flush=True)
        for name, part in self.parts.items():
            _describe(name, part)
    for name, part in self.parts.items():
        saved = None
        if "clone_grads" in MODES and name == "muon":
            saved = [(p, p.grad) for g in part.param_groups for p in g["params"] if p.grad is not None]
            for p, gr in saved:
                p.grad = gr.clone(memory_format=torch.contiguous_format)
        part.step()
        if saved:
            for p, gr in saved:
                p.grad = gr  # the graph writes the next step's gradient into this buffer
        if "sync" in MODES:
            _sync(f"optimizer part {name}")


opt.MuonWithAdamW.step = step

if "mixer_muon" in MODES:
    _matrices = opt.muon_matrices

    def muon_matrices(models, params):
        mixers = {id(p) for m in models for n, p in m.named_parameters() if opt.is_mixer_parameter(n)}
        return [p for p in _matrices(models, params) if id(p) in mixers]

    opt.muon_matrices = muon_matrices

if "clear_ws" in MODES:  # drop every cached cuBLAS workspace once the graph is captured
    from megatron_hypenet import cuda_graph
    _init = cuda_graph.CapturedStep.__init__

    def init(self, *a, **k):
        _init(self, *a, **k)
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()
        print("BISECT cleared cuBLAS workspaces after capture", flush=True)

    cuda_graph.CapturedStep.__init__ = init

if "opt_stream" in MODES:  # the optimizer on its own stream (so its own cuBLAS workspace)
    _step = opt.MuonWithAdamW.step
    OPT_STREAM = []

    def stream_step(self):
        if not OPT_STREAM:
            OPT_STREAM.append(torch.cuda.Stream())
        s, cur = OPT_STREAM[0], torch.cuda.current_stream()
        s.wait_stream(cur)
        with torch.cuda.stream(s):
            _step(self)
        cur.wait_stream(s)

    opt.MuonWithAdamW.step = stream_step

if __name__ == "__main__":
    print("BISECT torch", torch.__version__, torch.version.cuda, hasattr(torch._C, "_cuda_clearCublasWorkspaces"),
          flush=True)
    print(f"BISECT modes {sorted(MODES)}", flush=True)
    import pretrain_hypenet
    pretrain_hypenet.main(sys.argv[1:])
