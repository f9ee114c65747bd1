"""Gated DeltaNet ('D'): the PyTorch op against its float64 reference, the Megatron mixer (init from attention,
TP, HF export, generate) and the align stage with --rnn-mixer gated_deltanet."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import build_from_desc as _build
from helpers import load_model as _load
from helpers import check_hf_export, gated_delta_in_pieces, make_distill_work, perturb_norms, worker
from helpers import model_logits as _logits
from kernels import gated_delta_rule, gated_delta_rule_step, lightning_slopes
from kernels.gated_delta import gated_delta_rule_recurrent_ref
from megatron_hypenet import checkpoint, parallel
from megatron_hypenet.config import model_description, read_model_description
from megatron_hypenet.convert import hf_to_mcore
from megatron_hypenet.halo.init import init_student_from_teacher, load_hybrid
from megatron_hypenet.qwen3_mapping import attention_to_lightning_qkv
from megatron_hypenet.tiny import save_random_qwen3

VOCAB = 300
HYBRID = dict(layer_pattern="ADLD", attention_rope=False, attention_query_scale_base=16.0, lightning_short_conv=True)


# ---- the op ---------------------------------------------------------------------------------------

def _inputs(B, T, H, Dk, Dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = rand(B, T, H, Dk), rand(B, T, H, Dk), rand(B, T, H, Dv)
    decay = -torch.rand(B, T, H, generator=g, dtype=dtype) * 0.3  # log decay <= 0
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    h0 = rand(B, H, Dk, Dv)
    return [x.requires_grad_() for x in (q, k, v, decay, beta, h0)]


def _run(fn, q, k, v, g, beta, h0, dtype=None):
    cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))  # noqa: E731
    o, final = fn(*map(cast, (q, k, v, g, beta)), scale=0.7, initial_state=cast(h0), output_final_state=True)
    # a fixed random projection of both outputs, so every element's gradient is checked
    w = torch.Generator().manual_seed(9)
    loss = (o.double() * torch.randn(o.shape, generator=w, dtype=torch.float64)).sum() + \
        (final.double() * torch.randn(final.shape, generator=w, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, (q, k, v, g, beta, h0))
    return o.double(), final.double(), grads


@pytest.mark.parametrize("T", [1, 50, 64, 130])
def test_chunked_matches_float64_reference_values_and_grads(T):
    inputs = _inputs(2, T, 3, 16, 8)
    ref = _run(gated_delta_rule_recurrent_ref, *inputs)
    out = _run(gated_delta_rule, *inputs)
    assert (out[0] - ref[0]).abs().max() <= 1e-10
    assert (out[1] - ref[1]).abs().max() <= 1e-10
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), out[2], ref[2]):
        assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max().item()), name


def test_chunked_fp32_and_bf16_inputs_are_close_to_the_reference():
    inputs = _inputs(1, 80, 2, 32, 16)
    ref = _run(gated_delta_rule_recurrent_ref, *inputs)
    fp32 = _run(gated_delta_rule, *inputs, dtype=torch.float32)
    assert (fp32[0] - ref[0]).abs().max() <= 1e-4 and (fp32[1] - ref[1]).abs().max() <= 1e-4
    for a, b in zip(fp32[2], ref[2]):
        assert (a - b).norm() <= 1e-4 * b.norm()
    with torch.no_grad():
        q, k, v, g, beta, h0 = (x.bfloat16() for x in inputs)
        o, final = gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0.float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert (o.double() - ref[0]).norm() <= 0.02 * ref[0].norm()


def test_chunked_and_step_stay_fp32_under_bf16_autocast():
    # the trainer runs the model under bf16 autocast; the op's matmuls must not drop to bf16 there
    q, k, v, g, beta, h0 = (x.detach() for x in _inputs(1, 256, 2, 32, 16))
    ref_o, ref_s = gated_delta_rule_recurrent_ref(q, k, v, g, beta, scale=0.7, initial_state=h0,
                                                  output_final_state=True)
    fp32 = [x.float() for x in (q, k, v, g, beta, h0)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, final = gated_delta_rule(*fp32[:5], scale=0.7, initial_state=fp32[5], output_final_state=True)
        step_o, step_s = gated_delta_rule_step(*(x[:, 0] for x in fp32[:5]), fp32[5], scale=0.7)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert o.dtype == torch.float32 and rel(o, ref_o) <= 1e-5 and rel(final, ref_s) <= 1e-5
    assert rel(step_o, ref_o[:, 0]) <= 1e-5


def test_packed_sequences_restart_the_state():
    q, k, v, g, beta, _ = (x.detach() for x in _inputs(1, 90, 2, 8, 8))
    cu = torch.tensor([0, 20, 85, 90])
    h0 = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    o, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref_o, ref_s = gated_delta_rule_recurrent_ref(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                                      initial_state=h0[n : n + 1], output_final_state=True)
        assert (o[:, s:e] - ref_o).abs().max() <= 1e-10 and (final[n : n + 1] - ref_s).abs().max() <= 1e-10


@pytest.mark.parametrize("T, pieces", [(96, 3), (200, 4)])  # pieces of 32 tokens (under one chunk) and of 50
def test_pieces_joined_as_context_parallel_ranks_equal_one_run(T, pieces):
    """Each piece run from zero as an affine function of its entering state, then chained: the outputs,
    final state and gradients of one run over the whole sequence (float64)."""
    leaves = _inputs(2, T, 3, 16, 8)[:5]
    w = torch.Generator().manual_seed(9)
    results = []
    for run in (lambda *x: gated_delta_rule(*x, scale=0.7, output_final_state=True),
                lambda *x: gated_delta_in_pieces(*x, 0.7, pieces)):
        o, final = run(*leaves)
        w.manual_seed(9)
        loss = (o * torch.randn(o.shape, generator=w, dtype=o.dtype)).sum() + \
            (final * torch.randn(final.shape, generator=w, dtype=final.dtype)).sum()
        results.append([o, final, *torch.autograd.grad(loss, leaves)])
    for name, a, b in zip(["o", "final", "q", "k", "v", "g", "beta"], *results):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item()), name


def test_decode_steps_match_the_reference():
    q, k, v, g, beta, h0 = (x.detach() for x in _inputs(2, 7, 3, 8, 4))
    ref_o, ref_s = gated_delta_rule_recurrent_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    state = h0
    for t in range(7):
        o, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        assert (o - ref_o[:, t]).abs().max() <= 1e-12
    assert (state - ref_s).abs().max() <= 1e-12


def test_reference_gradcheck():
    inputs = _inputs(1, 3, 1, 3, 2)

    def f(*xs):
        o, s = gated_delta_rule_recurrent_ref(*xs[:5], initial_state=xs[5], output_final_state=True)
        return o, s

    assert torch.autograd.gradcheck(f, inputs)


def test_op_is_the_delta_rule_on_normalised_keys():
    """One token from a known state, by hand: a = e^g, S' = a S - b k (k^T a S) + b k v^T with unit q, k."""
    S = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    q, k, v = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[0.0, 2.0]]]), torch.tensor([[[1.0, -1.0, 2.0]]])
    g, b = torch.tensor([[-0.5]]), torch.tensor([[0.25]])
    a, kn, qn = math.exp(-0.5), torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.6, 0.8], dtype=torch.float64)
    S1 = a * S[0, 0] - 0.25 * kn[:, None] * (kn @ (a * S[0, 0]))[None] + 0.25 * kn[:, None] * v[0, 0].double()[None]
    o, S2 = gated_delta_rule_step(q.double(), k.double(), v.double(), g.double(), b.double(), S, scale=1.0)
    assert torch.allclose(S2[0, 0], S1, atol=1e-6) and torch.allclose(o[0, 0], qn @ S1, atol=1e-6)


# ---- the Megatron mixer ---------------------------------------------------------------------------

def _tokens(n=24, batch=2, seed=7):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A teacher and an "ADLD" student initialised from it (saved as init), then made random (saved as hybrid)."""
    root = tmp_path_factory.mktemp("gated_delta")
    save_random_qwen3(str(root / "qwen3"), seed=0, vocab_size=VOCAB, tie=False)
    parallel.initialize(1, 1)
    hf_to_mcore(str(root / "qwen3"), str(root / "teacher"))
    teacher, t_desc = _load(str(root / "teacher"))
    student = _build(t_desc, **HYBRID)
    init_student_from_teacher(student, teacher)
    desc = model_description(student.config, VOCAB, False, t_desc["hf_extra"])
    checkpoint.save_checkpoint(str(root / "init"), 0, student, desc)
    perturb_norms(student, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the zero-initialised decay/beta projections and the vectors would hide layout mistakes
        for name, p in student.named_parameters():
            if any(s in name for s in ("linear_a", "linear_b", "A_log", "dt_bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    checkpoint.save_checkpoint(str(root / "hybrid"), 0, student, desc)
    return root


def test_gated_deltanet_starts_from_attention_with_lightning_decay(work):
    teacher, _ = _load(str(work / "teacher"))
    student, desc = _load(str(work / "init"))
    for i, mixer in enumerate(desc["layer_pattern"]):
        s_mix, t_mix = student.decoder.layers[i].self_attention, teacher.decoder.layers[i].self_attention
        if mixer == "A":
            continue
        assert torch.equal(s_mix.linear_qkv.weight, attention_to_lightning_qkv(
            t_mix.linear_qkv.weight, t_mix.local_heads, t_mix.local_groups, t_mix.head_dim))
        assert torch.equal(s_mix.linear_proj.weight, t_mix.linear_proj.weight)
        assert torch.equal(s_mix.q_layernorm.weight, t_mix.q_layernorm.weight)
        if mixer == "D":
            assert not s_mix.linear_a.weight.any() and not s_mix.linear_b.weight.any()
            g = -s_mix.A_log.weight.exp() * torch.nn.functional.softplus(s_mix.dt_bias.weight)
            assert torch.allclose(g, -lightning_slopes(desc["lightning_num_heads"]), rtol=1e-6)


@pytest.fixture(scope="module")
def tp1_loss_grad(work):
    return worker(1, "loss_grad", str(work / "hybrid"), str(work / "lg1.pt"), tp=1)


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_loss_and_grads_equal_tp1(work, tp1_loss_grad, sp):
    one = tp1_loss_grad
    two = worker(2, "loss_grad", str(work / "hybrid"), str(work / f"lg2_{sp}.pt"), tp=2, sp=sp)
    assert torch.isfinite(one["loss"]) and one["loss"] > 0
    assert abs(float(one["loss"]) - float(two["loss"])) <= 1e-5
    assert set(one["grads"]) == set(two["grads"])
    for key, norm in one["grads"].items():
        assert norm > 0 and math.isclose(norm, two["grads"][key], rel_tol=1e-4), (key, norm, two["grads"][key])
    assert math.isclose(float(one["grad_norm"]), float(two["grad_norm"]), rel_tol=1e-4)


def test_cp3_loss_and_grads_equal_cp1(work, tp1_loss_grad):
    """Context parallel over 3 ranks: the last rank's entering state chains both earlier ranks' (S0, M)."""
    one = tp1_loss_grad
    three = worker(3, "loss_grad", str(work / "hybrid"), str(work / "cp3.pt"), tp=1, cp=3)
    assert abs(float(one["loss"]) - float(three["loss"])) <= 1e-5
    assert set(one["grads"]) == set(three["grads"])
    for key, norm in one["grads"].items():
        assert math.isclose(norm, three["grads"][key], rel_tol=1e-4), (key, norm, three["grads"][key])


def test_hf_export_logits_generate_and_round_trip(work):
    out, prompt = str(work / "hybrid_hf"), _tokens(n=9, batch=1)
    hf = check_hf_export(str(work / "hybrid"), out, prompt, 10)
    assert hf.config.layer_pattern == "ADLD"
    state = hf(prompt, use_cache=True).past_key_values.layers[1].recurrent_state
    assert state.dtype == torch.float32 and state.shape == (1, 4, 16, 16)

    hf_to_mcore(out, str(work / "back"))  # HF -> mcore: the same global tensors
    back, back_desc = _load(str(work / "back"))
    assert back_desc["layer_pattern"] == "ADLD"
    x = _tokens()
    assert torch.equal(_logits(back, x), _logits(_load(str(work / "hybrid"))[0], x))


# ---- HALO: align with --rnn-mixer gated_deltanet, and mismatched checkpoints -----------------------

def test_align_builds_gated_deltanet_and_mismatches_are_refused(tmp_path):
    from megatron_hypenet.recipe import run_stage

    work = make_distill_work(tmp_path, pattern="ALLA")
    common = dict(teacher=str(work / "teacher"), data_path=str(work / "data" / "corpus"), tokenizer=str(work / "hf"),
                  seq_length=64, micro_batch_size=2, split="90,10,0", train_iters=4, lr=3e-3,
                  lr_decay_style="constant", no_progress=True)
    run_stage("align", dict(common, save=str(tmp_path / "align"), rnn_mixer="gated_deltanet"))
    desc = read_model_description(checkpoint.resolve(str(tmp_path / "align")))
    assert desc["layer_pattern"] == "DDDD"
    model, _ = _load(str(tmp_path / "align"))
    mixer = model.decoder.layers[0].self_attention
    assert type(mixer).__name__ == "GatedDeltaNet" and mixer.linear_a.weight.any()  # trained away from zero

    # a Lightning pattern cannot take its mixers from a Gated DeltaNet align checkpoint, and vice versa
    teacher_desc = read_model_description(checkpoint.resolve(str(work / "teacher")))
    student = _build(teacher_desc, layer_pattern="ALLA")
    with pytest.raises(checkpoint.CheckpointError, match=r"'ALLA'.*Lightning Attention.*'DDDD'"):
        load_hybrid(student, "ALLA", str(work / "teacher"), str(tmp_path / "align"))
    with pytest.raises(checkpoint.CheckpointError, match=r"'ADDA'.*Gated DeltaNet.*'ALLA'"):
        load_hybrid(_build(teacher_desc, layer_pattern="ADDA"), "ADDA", str(work / "teacher"), str(work / "hybrid"))
    hybrid = _build(teacher_desc, layer_pattern="ADDA")
    load_hybrid(hybrid, "ADDA", str(work / "teacher"), str(tmp_path / "align"))
    assert torch.equal(hybrid.decoder.layers[1].self_attention.linear_a.weight,
                       model.decoder.layers[1].self_attention.linear_a.weight)


def test_fresh_hf_gated_deltanet_starts_as_megatron_does_and_loading_keeps_weights(tmp_path):
    from megatron_hypenet.hf.configuration_hypenet import HypeNetConfig
    from megatron_hypenet.hf.modeling_hypenet import HypeNetForCausalLM

    torch.manual_seed(0)
    config = HypeNetConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, num_hidden_layers=2, layer_pattern="DA")
    model = HypeNetForCausalLM(config)
    mixer = model.model.layers[0].linear_attn
    assert not mixer.a_proj.weight.any() and not mixer.b_proj.weight.any()  # beta 1/2, Lightning's decay
    assert torch.allclose(mixer.A_log.exp(), lightning_slopes(mixer.num_heads))
    with torch.no_grad():
        mixer.a_proj.weight.normal_()
        mixer.b_proj.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = HypeNetForCausalLM.from_pretrained(tmp_path).model.layers[0].linear_attn
    assert torch.equal(loaded.a_proj.weight, mixer.a_proj.weight)
    assert torch.equal(loaded.b_proj.weight, mixer.b_proj.weight)


def test_exported_folder_runs_gated_deltanet_without_this_repository(tmp_path, monkeypatch):
    import sys

    from megatron_hypenet.hf.configuration_hypenet import HypeNetConfig
    from megatron_hypenet.hf.export import write_hf_folder
    from megatron_hypenet.hf.modeling_hypenet import HypeNetForCausalLM

    torch.manual_seed(0)
    config = HypeNetConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, num_hidden_layers=2, layer_pattern="DA",
                           lightning_short_conv=True, initializer_range=0.1)
    model = HypeNetForCausalLM(config).eval()
    write_hf_folder(tmp_path / "hf", config, model.state_dict().items())
    for name in [m for m in sys.modules if m.split(".")[0] in ("kernels", "megatron_hypenet")]:
        monkeypatch.setitem(sys.modules, name, None)
    standalone = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert sys.modules[type(standalone).__module__].gated_delta_rule.__module__.endswith(".gated_delta_chunk")
    ids = torch.randint(1, 101, (1, 70))  # more than one chunk
    with torch.no_grad():
        assert (standalone(ids).logits - model(ids).logits).abs().max() <= 1e-5
