"""The megatron-core HypeNet model against transformers' Qwen3, across TP sizes, checkpoints and the HF export."""

import json
import math
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import build_from_desc as _build
from helpers import load_model as _load
from helpers import check_hf_export, perturb_norms, worker
from helpers import model_logits as _logits
from megatron_hypenet import checkpoint, parallel
from megatron_hypenet.config import MODEL_FILE, make_config, model_description, read_model_description
from megatron_hypenet.convert import hf_to_mcore, mcore_to_hf
from megatron_hypenet.halo.init import init_student_from_teacher
from megatron_hypenet.layers import query_scale
from megatron_hypenet.tiny import save_random_qwen3

VOCAB = 300  # padded to 384 inside Megatron: exercises the padding mask
HYBRID = dict(layer_pattern="ALLA", attention_rope=False, attention_query_scale_base=16.0, lightning_short_conv=True)


def _tokens(n=24, batch=2, seed=7):
    return torch.randint(0, VOCAB, (batch, n + 1), generator=torch.Generator().manual_seed(seed))[:, :-1]


def test_random_teacher_trains_its_eos_embedding(tmp_path):
    """The tiny teachers set no pad_token_id: HF would zero that embedding row, and with pad = EOS every
    document boundary would start from an all-zero hidden state (RMSNorm gradients of 1e19 in a random student)."""
    from safetensors.torch import load_file

    hf = save_random_qwen3(str(tmp_path), seed=0, vocab_size=64, eos_token_id=5)
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    assert config["eos_token_id"] == 5 and config.get("pad_token_id") is None
    embedding = load_file(os.path.join(hf, "model.safetensors"))["model.embed_tokens.weight"]
    assert embedding.norm(dim=1).min() > 0.01, embedding.norm(dim=1)[:8]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    hf = str(root / "qwen3")
    save_random_qwen3(hf, seed=0, vocab_size=VOCAB, tie=False)
    model = AutoModelForCausalLM.from_pretrained(hf)
    perturb_norms(model)
    model.save_pretrained(hf)
    parallel.initialize(1, 1)
    hf_to_mcore(hf, str(root / "teacher"))

    # A hybrid student with every Lightning option, initialised from the teacher, then made random.
    teacher, t_desc = _load(str(root / "teacher"))
    student = _build(t_desc, **HYBRID)
    init_student_from_teacher(student, teacher)
    perturb_norms(student, seed=1)
    desc = model_description(student.config, VOCAB, False, t_desc["hf_extra"])
    checkpoint.save_checkpoint(str(root / "hybrid"), 0, student, desc)

    # The same weights with the output norm taken per head.
    per_head = _build(t_desc, **HYBRID, lightning_output_norm_per_head=True)
    per_head.load_state_dict(student.state_dict())
    desc = model_description(per_head.config, VOCAB, False, t_desc["hf_extra"])
    checkpoint.save_checkpoint(str(root / "hybrid_per_head"), 0, per_head, desc)
    return root


def test_teacher_logits_equal_transformers_tp1(work):
    hf = AutoModelForCausalLM.from_pretrained(work / "qwen3").eval()
    model, _ = _load(str(work / "teacher"))
    x = _tokens()
    with torch.no_grad():
        ref = hf(x).logits
    assert (_logits(model, x) - ref).abs().max() <= 1e-4


def test_teacher_logits_equal_transformers_tp2(work):
    hf = AutoModelForCausalLM.from_pretrained(work / "qwen3").eval()
    out = worker(2, "logits", str(work / "teacher"), str(work / "tp2_logits.pt"), tp=2)
    from dist_worker import SEQ, tokens

    with torch.no_grad():
        ref = hf(tokens(VOCAB)[:, :SEQ]).logits
    assert (out["logits"] - ref).abs().max() <= 1e-4


def test_hypenet_tp2_loss_and_grads_equal_tp1(work):
    one = worker(1, "loss_grad", str(work / "hybrid"), str(work / "lg1.pt"), tp=1)
    two = worker(2, "loss_grad", str(work / "hybrid"), str(work / "lg2.pt"), tp=2)
    assert torch.isfinite(one["loss"]) and one["loss"] > 0
    assert abs(float(one["loss"]) - float(two["loss"])) <= 1e-5
    assert math.isclose(float(one["grad_norm"]), float(two["grad_norm"]), rel_tol=1e-4)


def test_hypenet_cp2_loss_and_grads_equal_cp1(work):
    """Context parallel: Lightning states passed across ranks, attention over gathered K/V, conv halos."""
    one = worker(1, "loss_grad", str(work / "hybrid"), str(work / "cp1.pt"), tp=1)
    two = worker(2, "loss_grad", str(work / "hybrid"), str(work / "cp2.pt"), tp=1, cp=2)
    assert abs(float(one["loss"]) - float(two["loss"])) <= 1e-5
    assert math.isclose(float(one["grad_norm"]), float(two["grad_norm"]), rel_tol=1e-4)


def _head_rms(model, x):
    """RMS of each head of the first RNN layer's normalised output (before the gate), [s, b, H]."""
    mixer = model.decoder.layers[1].self_attention
    with torch.no_grad():
        mixer.out_norm.weight.fill_(1.0)
        qkv, _ = mixer.linear_qkv(x)
        o = mixer.core(qkv)
    return o.unflatten(-1, (mixer.local_heads, mixer.head_dim)).pow(2).mean(-1).sqrt()


def test_per_head_output_norm_gives_every_head_unit_rms(work):
    over_all_model, desc = _load(str(work / "hybrid"))
    x = torch.randn(24, 2, desc["hidden_size"], generator=torch.Generator().manual_seed(5))
    per_head = _head_rms(_load(str(work / "hybrid_per_head"))[0], x)
    over_all = _head_rms(over_all_model, x)
    assert torch.allclose(per_head, torch.ones_like(per_head), atol=1e-3)
    # over all heads only the mean square is 1: the heads' own scales differ (the slow decays' are larger)
    assert torch.allclose(over_all.pow(2).mean(-1), torch.ones(24, 2), atol=1e-3)
    assert (over_all - 1).abs().max() > 0.1


def test_per_head_output_norm_tp2_equals_tp1_and_exports(work):
    """Per head, a TP rank normalises its own heads (no all-reduce): TP=2 gives TP=1's loss and gradients, and
    the HF export reproduces the Megatron model."""
    one = worker(1, "loss_grad", str(work / "hybrid_per_head"), str(work / "ph1.pt"), tp=1)
    two = worker(2, "loss_grad", str(work / "hybrid_per_head"), str(work / "ph2.pt"), tp=2)
    assert abs(float(one["loss"]) - float(two["loss"])) <= 1e-5
    assert math.isclose(float(one["grad_norm"]), float(two["grad_norm"]), rel_tol=1e-4)
    hf = check_hf_export(str(work / "hybrid_per_head"), str(work / "hybrid_per_head_hf"), _tokens(n=9, batch=1), 12)
    assert hf.config.lightning_output_norm_per_head


def test_checkpoint_saved_at_tp2_loads_at_tp1(work):
    saved = worker(2, "save", str(work / "hybrid"), str(work / "resave.pt"), tp=2)["saved"]
    original, _ = _load(str(work / "hybrid"))
    resharded, _ = _load(saved)
    x = _tokens()
    assert torch.equal(_logits(original, x), _logits(resharded, x))


def test_hf_round_trip_gives_transformers_logits(work):
    out = str(work / "roundtrip")
    mcore_to_hf(str(work / "teacher"), out, overwrite=True)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "qwen3"
    a = AutoModelForCausalLM.from_pretrained(work / "qwen3").eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    x = _tokens()
    with torch.no_grad():
        assert (a(x).logits - b(x).logits).abs().max() <= 1e-4


def test_rope_theta_carries_through_conversion_and_export(tmp_path):
    # Neither the 1e4 of the tiny teachers nor the 1e6 default a missing theta falls back to: a base that is
    # dropped anywhere on the way changes the rotary angles and the logits.
    hf = str(tmp_path / "qwen3")
    save_random_qwen3(hf, seed=0, vocab_size=VOCAB, tie=False, rope_theta=12345.0)
    assert json.load(open(os.path.join(hf, "config.json")))["rope_parameters"]["rope_theta"] == 12345.0
    hf_to_mcore(hf, str(tmp_path / "teacher"))
    teacher, desc = _load(str(tmp_path / "teacher"))
    assert teacher.config.rope_theta == 12345.0
    x = _tokens(n=48)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf).eval()(x).logits
    assert (_logits(teacher, x) - ref).abs().max() <= 1e-4

    student = _build(desc, **{**HYBRID, "attention_rope": True})  # RoPE in every layer: the base matters everywhere
    init_student_from_teacher(student, teacher)
    checkpoint.save_checkpoint(str(tmp_path / "hybrid"), 0, student, model_description(student.config, VOCAB, False,
                                                                                       desc["hf_extra"]))
    exported = check_hf_export(str(tmp_path / "hybrid"), str(tmp_path / "hybrid_hf"), _tokens(n=9, batch=1), 4)
    assert exported.config.rope_theta == 12345.0


def test_hf_export_generate_equals_megatron_greedy(work):
    check_hf_export(str(work / "hybrid"), str(work / "hybrid_hf"), _tokens(n=9, batch=1), 12)


def test_hype_query_scale_formula():
    pos = torch.arange(6)
    assert torch.allclose(query_scale(pos, 256.0), torch.log(pos + 256.0) / math.log(256.0))
    assert query_scale(pos, 256.0)[0] == 1 and torch.all(query_scale(pos, 256.0).diff() > 0)


def test_hype_attention_layer_scales_queries(work):
    """One Megatron attention mixer against a hand-written NoPE attention with q_i * log(i+a)/log(a)."""
    model, desc = _load(str(work / "hybrid"))
    mixer = model.decoder.layers[0].self_attention
    H, G, D = desc["num_attention_heads"], desc["num_query_groups"], desc["kv_channels"]
    x = torch.randn(10, 1, desc["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, _ = mixer(x)
        from megatron_hypenet.qwen3_mapping import split_qkv_grouped

        wq, wk, wv = split_qkv_grouped(mixer.linear_qkv.weight, H, G, D)
        rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + desc["layernorm_epsilon"]) * w  # noqa: E731
        q = rms((x[:, 0] @ wq.t()).view(10, H, D), mixer.q_layernorm.weight)
        k = rms((x[:, 0] @ wk.t()).view(10, G, D), mixer.k_layernorm.weight).repeat_interleave(H // G, 1)
        v = (x[:, 0] @ wv.t()).view(10, G, D).repeat_interleave(H // G, 1)
        a = HYBRID["attention_query_scale_base"]
        q = q * (torch.log(torch.arange(10.0) + a) / math.log(a))[:, None, None]
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
        o = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(10, H * D)
        ref = o @ mixer.linear_proj.weight.t()
    assert (y[:, 0] - ref).abs().max() <= 1e-5


# ---- clear errors -----------------------------------------------------------------------------

def test_wrong_pattern_length_is_refused():
    with pytest.raises(ValueError, match="layer_pattern has 3 characters but the model has 4 layers"):
        make_config(num_layers=4, hidden_size=64, num_attention_heads=4, layer_pattern="ALL")
    with pytest.raises(ValueError, match="only contain 'A' and 'L'"):
        make_config(num_layers=2, hidden_size=64, num_attention_heads=4, layer_pattern="AX")


def test_mismatched_checkpoint_is_refused(work):
    teacher, t_desc = _load(str(work / "teacher"))
    with pytest.raises(checkpoint.CheckpointError, match="layer_pattern"):
        checkpoint.load_checkpoint(str(work / "hybrid"), teacher, t_desc)


def test_per_head_checkpoint_is_refused_by_an_all_heads_model(work, tmp_path):
    model, desc = _load(str(work / "hybrid"))
    with pytest.raises(checkpoint.CheckpointError, match="lightning_output_norm_per_head=True"):
        checkpoint.load_checkpoint(str(work / "hybrid_per_head"), model, desc)
    # a description written before the field existed reads as the norm over all heads
    old = tmp_path / "old"
    shutil.copytree(work / "hybrid", old)
    path = old / "iter_0000000" / MODEL_FILE
    saved = json.load(open(path))
    del saved["lightning_output_norm_per_head"]
    json.dump(saved, open(path, "w"))
    assert read_model_description(str(old / "iter_0000000"))["lightning_output_norm_per_head"] is False
    checkpoint.load_checkpoint(str(old), model, desc)


def test_missing_files_are_reported(work, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_to_mcore(str(tmp_path / "nope"), str(tmp_path / "out"))
    empty = tmp_path / "empty_hf"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_to_mcore(str(empty), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.resolve(str(tmp_path / "no_ckpt"))
    partial = tmp_path / "partial"
    shutil.copytree(work / "teacher", partial)
    os.remove(partial / "iter_0000000" / "metadata.json")  # as a killed save would leave it
    with pytest.raises(checkpoint.CheckpointError, match="partial save"):
        checkpoint.resolve(str(partial))


def test_hf_folder_missing_a_tensor_is_refused(work, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(work / "qwen3", broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        hf_to_mcore(str(broken), str(tmp_path / "out"))


def test_clip_grad_norm_matches_torch_and_skips_the_shared_copy():
    """The trainer's norm and clipping equal torch's on one process; a tied embedding's second copy
    (`shared`) is left out of the norm but clipped with the rest."""
    from megatron_hypenet.training import clip_grad_norm

    parallel.initialize(1, 1)
    try:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 50, 7)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        reference = [p.grad.clone() for p in params]
        expected = torch.nn.utils.get_total_norm(reference).item()
        shared = torch.nn.Parameter(torch.zeros(4))
        shared.grad, shared.shared = torch.full((4,), 100.0), True
        assert clip_grad_norm(params + [shared], 0.0) == pytest.approx(expected, rel=1e-6)  # 0: no clipping
        assert all(torch.equal(p.grad, r) for p, r in zip(params, reference))
        assert clip_grad_norm(params + [shared], 1.0) == pytest.approx(expected, rel=1e-6)
        scale = 1.0 / (expected + 1e-6)
        for p, r in zip(params, reference):
            assert torch.allclose(p.grad, r * scale, rtol=1e-6)
        assert torch.allclose(shared.grad, torch.full((4,), 100.0 * scale))
        assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(1.0, rel=1e-5)
    finally:
        parallel.destroy()
