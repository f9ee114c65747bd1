"""The training loop shared by every HALO stage; read it top to bottom.

    set up parallelism -> build the stage's models -> resume or initialise -> data -> for each step:
    forward/backward of the step's micro-batches through megatron-core's pipeline schedule (pipeline.py),
    grad sync (TP-replicated params, tied embeddings across stages, data parallel), clip, optimizer step,
    schedule, log, save
"""

import json
import logging
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from . import checkpoint, parallel, pipeline, zero3
from .arguments import save_resolved
from .convert import TOKENIZER_DIR, copy_tokenizer, find_tokenizer
from .cuda_graph import CapturedStep
from .data import build_gpt_datasets, make_dataloader
from .distributed_optimizer import DistributedOptimizer
from .files import replaced_atomically
from .halo.stages import build_stage
from .model import compile_layers
from .optimizer import build_optimizer, set_lr

log = logging.getLogger("megatron_hypenet")


# ---- learning-rate schedule (a pure function of the iteration, so resuming needs no state) -------

def learning_rate(it: int, args) -> float:
    if args.lr_warmup_iters and it < args.lr_warmup_iters:
        return args.lr * (it + 1) / args.lr_warmup_iters
    span = max(1, args.train_iters - args.lr_warmup_iters)
    frac = (it - args.lr_warmup_iters) / span
    if args.lr_decay_style == "constant":
        return args.lr
    if args.lr_decay_style == "cosine":
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac))
    if args.lr_decay_style == "linear":
        return args.lr - (args.lr - args.min_lr) * frac
    # warmup-stable-decay: constant, then a linear drop to min_lr over the last fraction of steps
    decay_start = 1 - args.lr_wsd_decay_fraction
    if frac < decay_start:
        return args.lr
    return args.lr - (args.lr - args.min_lr) * (frac - decay_start) / max(args.lr_wsd_decay_fraction, 1e-8)


# ---- gradients --------------------------------------------------------------------------------

def _tp_partial(name: str, p) -> bool:
    """Replicated parameters whose gradient each TP rank computes only in part (megatron-core's rule)."""
    return "q_layernorm" in name or "k_layernorm" in name or getattr(p, "sequence_parallel", False)


def sync_grads(model) -> None:
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group.size() > 1:
        for name, p in model.named_parameters():
            if p.grad is not None and _tp_partial(name, p):
                dist.all_reduce(p.grad, group=tp_group)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dp_group.size() > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp_group.size()


def clip_grad_norm(params, max_norm: float) -> float:
    """Global grad norm over the model-parallel group, counting TP-replicated params once and a tied
    embedding once (megatron marks the last stage's copy `shared`). Computed where the gradients are, with
    one host sync: a sync per parameter stalls a GPU that small models keep waiting on the host anyway."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    counted = [p.grad.detach() for p in params if p.grad is not None and not getattr(p, "shared", False)
               and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)]
    sq = torch.zeros((), dtype=torch.float64, device=parallel.device())
    if counted:
        sq += torch.nn.utils.get_total_norm(counted).double() ** 2
    mp_group = parallel_state.get_model_parallel_group()
    if mp_group.size() > 1:
        dist.all_reduce(sq, group=mp_group)
    norm = float(sq.sqrt())
    if max_norm and math.isfinite(norm) and norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))  # x max_norm / (norm + 1e-6)
    return norm


# ---- RNG state, so a resumed run continues the same random stream ---------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# ---- logging ----------------------------------------------------------------------------------

class MetricsLogger:
    """metrics.jsonl (always), TensorBoard, and wandb (offline by default) on rank 0.

    A run that starts at iteration `start` first drops the rows after it: they are from a killed run's
    steps past its last checkpoint, which this run repeats.
    """

    def __init__(self, args, start: int = 0):
        self.enabled = parallel.is_rank0() and args.save
        self.jsonl = self.tb = self.wandb = None
        if not self.enabled:
            return
        os.makedirs(args.save, exist_ok=True)
        path = os.path.join(args.save, "metrics.jsonl")
        truncate_metrics(path, start)
        self.jsonl = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(args.tensorboard_dir or os.path.join(args.save, "tensorboard"),
                                    purge_step=start + 1 if start else None)
        except ImportError:
            log.warning("tensorboard is not installed; TensorBoard logging is off")
        if args.wandb_project and args.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, mode=args.wandb_mode, dir=args.save,
                                    config=vars(args), name=f"{args.stage}-{os.path.basename(args.save.rstrip('/'))}")

    def log(self, it: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"iteration": it, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                if self.tb:
                    self.tb.add_scalar(f"{k}", v, it)
        if self.wandb:
            self.wandb.log(metrics, step=it)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def truncate_metrics(path: str, last_iteration: int) -> None:
    """Keeps the rows of iterations <= last_iteration (and drops a row cut short by a kill)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("iteration", 0) <= last_iteration:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        with replaced_atomically(path) as f:
            f.writelines(keep)


def check_tokenizer(tokenizer_dir: str, desc: dict) -> None:
    """The tokenizer must be the model's: ids it produces (and the EOD between documents) index the embedding."""
    from .data import eod_token_id, load_tokenizer

    tokenizer, vocab = load_tokenizer(tokenizer_dir), desc["vocab_size"]
    eod = eod_token_id(tokenizer)
    if len(tokenizer) > vocab or not 0 <= eod < vocab:
        raise ValueError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens (end-of-document id {eod}) but the model has "
            f"vocab_size {vocab}: it is not this teacher's tokenizer. Pass the teacher's HF folder with --tokenizer "
            f"(or leave --tokenizer out to use the one stored with the checkpoint) and preprocess --data-path with it")


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (Slurm's warning before a kill) ask for a checkpoint and a clean exit (code 0).

    The flag is checked after every iteration, so the exit comes at most one iteration and one save
    after the signal. dist_checkpointing's save helper process is started here, signal-proof
    (`checkpoint.start_save_helper`), unless an earlier save in this process started it: a process
    that saves before training (the recipe's teacher conversion) calls that function first. The writer
    processes `--async-save` forks inherit the handler below, so they finish their writes too.
    """

    SIGNALS = checkpoint.PREEMPTION_SIGNALS

    def __init__(self):
        self.raised = False
        self.pid = os.getpid()
        self.previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in self.SIGNALS}
        checkpoint.start_save_helper()
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:
            return  # a forked checkpoint writer (--async-save): it finishes its write, the trainer commits it
        log.warning("received signal %s: saving a checkpoint and exiting", signum)
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([float(self.raised)], device=parallel.device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---- the loop ---------------------------------------------------------------------------------


def train(args) -> dict:
    preempt = PreemptionFlag()  # first: a signal during start-up must not kill the job either
    try:
        return _train(args, preempt)
    finally:
        preempt.restore()


def _train(args, preempt: PreemptionFlag) -> dict:
    pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
    parallel.initialize(args.tensor_model_parallel_size, pp, args.context_parallel_size, vpp=vpp, seed=args.seed)
    device = parallel.device()
    dp_size = parallel_state.get_data_parallel_world_size()
    global_batch = args.global_batch_size or args.micro_batch_size * dp_size
    if global_batch % (args.micro_batch_size * dp_size):
        raise ValueError(f"--global-batch-size {global_batch} is not a multiple of micro batch x data parallel "
                         f"({args.micro_batch_size} x {dp_size})")
    accumulation = global_batch // (args.micro_batch_size * dp_size)  # micro-batches per step and rank
    if vpp and (accumulation % pp or args.eval_iters % pp):
        raise ValueError(f"the interleaved pipeline schedule runs micro-batches in groups of PP={pp}: this run has "
                         f"{accumulation} per step (--global-batch-size / (micro batch x data parallel)) and "
                         f"--eval-iters {args.eval_iters}; make both multiples of {pp}")

    stage = build_stage(args)
    student = stage.student  # this rank's chunks (one per virtual pipeline stage)
    models = student + (stage.teacher or [])
    for model in models:
        model.to(device)
    if args.compile:
        # a recipe trains stage after stage in one process: drop the earlier stages' compiled layers, which would
        # count against dynamo's recompile limit (model.compile_layers) and never run again
        torch.compiler.reset()
        for model in models:
            compile_layers(model)
        log.info("--compile: %d decoder layers compile on their first steps",
                 sum(len(m.decoder.layers) for m in models))
    if args.use_distributed_optimizer:  # megatron-core's DDP + sharded AdamW state (distributed_optimizer.py)
        optimizer = DistributedOptimizer(args, student)
    else:
        optimizer = build_optimizer(args, student, stage.trainable)  # --optimizer: AdamW or Muon (optimizer.py)

    # Check the tokenizer and the data before anything in --save is touched.
    tokenizer_dir = args.tokenizer or find_tokenizer(checkpoint.resolve(args.teacher or args.load))
    if tokenizer_dir is None:
        raise FileNotFoundError("no tokenizer: pass --tokenizer DIR (the teacher's HF folder)")
    check_tokenizer(tokenizer_dir, stage.desc)
    train_ds, valid_ds, _ = build_gpt_datasets(
        args.data_path, args.seq_length, args.seed, args.train_iters * global_batch,
        valid_samples=max(1, args.eval_iters * args.micro_batch_size), tokenizer_dir=tokenizer_dir, split=args.split)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    # Resume from --save (same stage) or initialise from --load/--teacher.
    start, consumed, bad_steps = 0, 0, 0
    resume = args.save and not args.no_resume and checkpoint.latest_iteration(args.save) is not None
    if resume:
        path, state = checkpoint.load_checkpoint(args.save, student, stage.desc,
                                                 None if args.zero_stage == 3 else optimizer, iteration=args.ckpt_step)
        if state is None or state.get("stage") != args.stage:
            raise checkpoint.CheckpointError(
                f"{path} holds stage {state and state.get('stage')!r}, not {args.stage!r}: give each stage its "
                f"own --save folder (pass the previous stage's with --load), or --no-resume")
        start, consumed, bad_steps = state["iteration"], state["consumed_samples"], state.get("bad_steps", 0)
        set_rng_state(state["rng"])
        log.info("resumed %s at iteration %d from %s", args.stage, start, path)
    else:
        calibration = []

        def forward_first_micro_batch():
            """The stage forward-only on the run's first micro-batch (of data-parallel rank 0, the same on every
            rank), which the first step trains on anyway: what align's calibrated init measures
            (halo/calibrate.py). Read from the data only when a stage's initialisation asks for it."""
            if not calibration:
                first = make_dataloader(train_ds, args.micro_batch_size, 0, args.seed)
                calibration.append(parallel.local_batch(next(iter(first)), device))
            pipeline.run(stage.chunks, calibration, args.seq_length, args.micro_batch_size * stage.stacked,
                         forward_only=True, autocast=autocast, whole_model_loss=stage.loss)

        stage.initialise(forward_first_micro_batch)
    if args.zero_stage == 3:  # DeepSpeed takes over the student's parameters and AdamW from here (zero3.py)
        optimizer = zero3.ZeroOptimizer(args, stage, optimizer, resume_from=path if resume else None)
    if args.save:
        for stale in checkpoint.remove_partial_saves(args.save):  # collective: every rank calls it
            log.warning("removed %s, left by an interrupted save", stale)
        if parallel.is_rank0():  # one writer: ranks racing on the same files fail each other
            save_resolved(args, args.save)
            # checkpoints carry their tokenizer to the next stage and the export
            copy_tokenizer(tokenizer_dir, os.path.join(args.save, TOKENIZER_DIR))
    dp_rank = parallel_state.get_data_parallel_rank()
    loader = iter(make_dataloader(train_ds, args.micro_batch_size, consumed, args.seed, dp_rank, dp_size))

    metrics_log = MetricsLogger(args, start)
    saves = checkpoint.AsyncSaves()  # --async-save: checkpoints written while training goes on
    last_loss, stopped = float("nan"), False
    tokens_per_iter = global_batch * args.seq_length
    bar = tqdm(range(start, args.train_iters), desc=args.stage, initial=start, total=args.train_iters,
               disable=args.no_progress or not parallel.is_rank0())
    for model in student:
        model.train()
    captured = None  # --cuda-graph: the step's forward and backward, captured on the first step
    it = start
    for it in bar:
        t0 = time.time()
        lr = learning_rate(it, args)
        set_lr(optimizer, lr)
        batches = [parallel.local_batch(next(loader), device) for _ in range(accumulation)]
        if args.cuda_graph:  # the graph owns the gradients and rewrites them each replay (cuda_graph.py)
            if captured is None:
                captured = CapturedStep(stage.loss, stage.trainable, batches, args.bf16)
                log.info("--cuda-graph: captured the step's forward and backward (%d micro-batches)", accumulation)
            loss_sum = captured.run(batches)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss_sum = pipeline.run(stage.chunks, batches, args.seq_length, args.micro_batch_size * stage.stacked,
                                    autocast=autocast,
                                    whole_model_loss=optimizer.loss if args.zero_stage == 3 else stage.loss)
        loss_sum = parallel.data_parallel_mean(loss_sum)  # the global batch's loss, on every rank
        consumed += global_batch
        if not args.use_distributed_optimizer:  # (megatron-core's DDP reduces its gradients in optimizer.step)
            for model in student:
                sync_grads(model)
            pipeline.allreduce_tied_embedding_grads(student)
        if args.zero_stage == 3 or args.use_distributed_optimizer:  # both clip, step, and skip a non-finite step
            grad_norm = optimizer.step()
        else:
            grad_norm = clip_grad_norm(stage.trainable, args.clip_grad)
            if math.isfinite(loss_sum) and math.isfinite(grad_norm):
                optimizer.step()
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if finite:
            bad_steps = 0
            last_loss = loss_sum
        else:
            bad_steps += 1
            log.warning("iteration %d: loss %s, grad norm %s is not finite; step skipped", it + 1, loss_sum, grad_norm)
        dt = time.time() - t0
        metrics = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_iter / dt, "memory_gb": memory_gb(), "consumed_samples": consumed,
                   "skipped": not finite}
        if args.eval_interval and (it + 1) % args.eval_interval == 0:
            metrics["valid_loss"] = evaluate(stage, valid_ds, args, device, autocast)
        metrics_log.log(it + 1, metrics)
        if not finite and (args.nan_policy == "stop" or bad_steps >= args.max_skipped_iters):
            metrics_log.close()
            saves.wait()  # a good checkpoint may still be in flight
            last = checkpoint.latest_iteration(args.save) if args.save else None
            raise FloatingPointError(
                f"non-finite loss/gradients at iteration {it + 1} ({bad_steps} in a row, --nan-policy "
                f"{args.nan_policy}, --max-skipped-iters {args.max_skipped_iters}); lower --lr or --clip-grad, "
                f"or check the data near consumed sample {consumed - global_batch}. Last good checkpoint: "
                f"iteration {last} in {args.save}")
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{metrics['lr']:.2e}")
        if (it + 1) % args.log_interval == 0 and parallel.is_rank0() and args.no_progress:
            log.info("%s it %d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s", args.stage, it + 1, loss_sum,
                     metrics["lr"], grad_norm, metrics["tokens_per_s"])
        done = it + 1 == args.train_iters
        stopped = preempt.any_rank()
        saves.poll()  # commits background saves every rank has finished (collective, does not wait)
        if args.save and (done or stopped or (args.save_interval and (it + 1) % args.save_interval == 0)):
            state = {"stage": args.stage, "iteration": it + 1, "consumed_samples": consumed, "rng": rng_state(),
                     "bad_steps": bad_steps}
            if args.zero_stage == 3:  # the engine state, then the gathered model (zero3.py)
                optimizer.save(it + 1, stage.desc, state, args.keep_last)
            else:
                checkpoint.save_checkpoint(args.save, it + 1, student, stage.desc, optimizer, state, args.keep_last,
                                           async_saves=saves if args.async_save else None)
        if done or stopped:
            saves.wait()  # the last checkpoint is committed before train() returns or a pre-empted job exits
        if stopped:
            log.warning("stopped at iteration %d after a checkpoint (pre-emption)", it + 1)
            break
    metrics_log.close()
    summary = {"stage": args.stage, "iterations": it + 1 if args.train_iters > start else start, "loss": last_loss}
    if stopped:
        summary["preempted"] = True  # no final evaluation: the job is about to be killed
    elif valid_ds is not None and len(valid_ds) > 0:
        summary["valid_loss"] = evaluate(stage, valid_ds, args, device, autocast)
    return summary


@torch.no_grad()
def evaluate(stage, dataset, args, device, autocast) -> float:
    loader = make_dataloader(dataset, args.micro_batch_size, 0, args.seed)
    batches = [parallel.local_batch(batch, device) for batch, _ in zip(loader, range(args.eval_iters))]
    if not batches:
        return float("nan")
    for model in stage.student:
        model.eval()
    loss = pipeline.run(stage.chunks, batches, args.seq_length, args.micro_batch_size * stage.stacked,
                        forward_only=True, autocast=autocast, whole_model_loss=stage.loss)
    for model in stage.student:
        model.train()
    return parallel.context_parallel_mean(loss)
