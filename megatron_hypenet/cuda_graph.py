"""--cuda-graph: a training step's forward and backward captured once as a CUDA graph, then replayed.

At the HALO stages' small micro-batches (issue #7: 2 x 1024 tokens) a distill step launches about 3,800
kernels, and the host launching them, not the GPU, sets the pace: 127 ms per step on an H100 eager, 27 ms
replayed (docs/benchmarks.md, "CUDA graphs"). A replay launches the whole step at once.

Left outside the graph, as in an eager step: the optimizer (it reads the learning rate, a host float),
gradient all-reduce and clipping, and every host read (loss, grad norm). Inside: the forward and backward
of every micro-batch of the step. What capture needs, and this class arranges:
- fixed shapes: every step's micro-batches are copied into the same static tensors;
- no host sync inside the step, and autocast without its weight-cast cache (a cast cached during the
  capture would be a stale buffer afterwards);
- gradients the graph owns: capture starts from `grad is None`, so each replay's first backward writes the
  gradients afresh (later micro-batches add to them). The trainer must therefore not set them to None
  between steps; the optimizer and clipping read and scale them in place.
"""

import torch


class CapturedStep:
    """forward+backward of one step's micro-batches (`loss_fn(batch)` each, averaged) as one CUDA graph."""

    def __init__(self, loss_fn, params, micro_batches: list, bf16: bool, warmup: int = 3):
        if not micro_batches or not all(t.is_cuda for b in micro_batches for t in b.values()):
            raise ValueError("--cuda-graph captures CUDA work: run it on a GPU (leave --cuda-graph out on CPU)")
        self.loss_fn, self.params, self.bf16 = loss_fn, list(params), bf16
        self.static = [{k: v.clone() for k, v in b.items()} for b in micro_batches]
        # Warm-up on a side stream (lazy inits, Triton and cuBLAS set-up, compiled layers' first calls) must
        # not leak into training: its gradients are dropped before the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._drop_grads()
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self._drop_grads()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader, TensorBoard and checkpoint threads may touch CUDA meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss = self._step()

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _step(self) -> torch.Tensor:
        n = len(self.static)
        total = None
        for batch in self.static:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
                loss = self.loss_fn(batch)
            (loss / n).backward()  # the mean over micro-batches, as megatron-core's schedules scale it
            total = loss.detach() if total is None else total + loss.detach()
        return total / n

    def run(self, micro_batches: list) -> float:
        """Replays the step on `micro_batches` (same count, keys and shapes as the captured ones); the mean loss."""
        if len(micro_batches) != len(self.static):
            raise ValueError(f"the step was captured with {len(self.static)} micro-batches, got {len(micro_batches)}")
        for static, batch in zip(self.static, micro_batches):
            for key, buf in static.items():
                if batch[key].shape != buf.shape:
                    raise ValueError(f"--cuda-graph replays fixed shapes: batch[{key!r}] is {tuple(batch[key].shape)}, "
                                     f"the captured step's {tuple(buf.shape)}")
                buf.copy_(batch[key], non_blocking=True)
        self.graph.replay()
        return float(self.loss)
