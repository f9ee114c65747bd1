"""The standalone Hugging Face HypeNet (megatron_hypenet/hf) and its folder writer, on tiny random models (CPU)."""

import json
import math
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from megatron_hypenet.hf.configuration_hypenet import HypeNetConfig
from megatron_hypenet.hf.export import iter_hf_tensors, write_hf_folder
from megatron_hypenet.hf.modeling_hypenet import HypeNetForCausalLM

VOCAB, PAD = 101, 0
SIZES = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matmuls: thread hand-offs cost more than they save, and are ruinous on a loaded CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model, std=0.3):
    """Random norms and convs: at their init (ones, identity) they would hide mistakes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "conv" in name:
                p.add_(torch.randn_like(p) * std)
    return model.eval()


def _export_state(model):
    """What an exporter gives write_hf_folder: the state dict, lm_head left out when tied."""
    tied = model.config.tie_word_embeddings
    return ((k, v) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight"))


def _hybrid_config(**overrides):
    fields = dict(
        SIZES,
        num_hidden_layers=4,
        layer_pattern="ALLA",
        lightning_num_heads=2,
        lightning_head_dim=24,  # not the attention head_dim: each mixer gets its own RoPE table
        lightning_short_conv=True,
        lightning_conv_size=3,
        initializer_range=0.1,
        pad_token_id=PAD,
        eos_token_id=None,  # generation runs to max_new_tokens
    )
    fields.update(overrides)
    return HypeNetConfig(**fields)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """(original model, the same model exported and reloaded through trust_remote_code, its folder)."""
    torch.manual_seed(0)
    model = _perturb(HypeNetForCausalLM(_hybrid_config()))
    out = tmp_path_factory.mktemp("export") / "hypenet-tiny"
    write_hf_folder(out, model.config, _export_state(model), max_shard_bytes=64 * 1024)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return model, reloaded, out


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def _left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


# (a) ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_all_attention_hypenet_is_qwen3(tied):
    torch.manual_seed(0)
    qwen_config = Qwen3Config(**SIZES, num_hidden_layers=2, tie_word_embeddings=tied, rope_theta=10_000.0)
    qwen = _perturb(Qwen3ForCausalLM(qwen_config))
    config = HypeNetConfig(
        **SIZES, num_hidden_layers=2, tie_word_embeddings=tied, rope_theta=10_000.0,
        attention_rope=True, attention_query_scale_base=None,
    )
    hypenet = HypeNetForCausalLM(config).eval()
    hypenet.load_state_dict(qwen.state_dict(), strict=True)
    assert (hypenet.lm_head.weight is hypenet.model.embed_tokens.weight) == tied
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        diff = (hypenet(ids).logits - qwen(ids).logits).abs().max().item()
    assert diff <= 1e-5


# (b) ------------------------------------------------------------------------------------------------


def test_export_reload_runs_the_folder_code(hybrid, tmp_path):
    model, reloaded, _ = hybrid
    assert type(reloaded).__module__.startswith("transformers_modules.")  # the folder's copy, not this package
    ids = torch.randint(1, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_exported_folder_needs_nothing_from_this_repository(hybrid, tmp_path, monkeypatch):
    _, reloaded, folder = hybrid
    # the reloaded model's Lightning reference is the folder's own copy, found by transformers' loader
    assert sys.modules[type(reloaded).__module__].lightning_slopes.__module__.endswith(".lightning_naive")

    # as on a machine without this repository: no kernels, no megatron_hypenet
    for name in [m for m in sys.modules if m.split(".")[0] in ("kernels", "megatron_hypenet")]:
        monkeypatch.setitem(sys.modules, name, None)
    standalone = shutil.copytree(folder, tmp_path / "standalone")  # a new folder name: its code is imported afresh
    model = AutoModelForCausalLM.from_pretrained(standalone, trust_remote_code=True).eval()
    assert sys.modules[type(model).__module__].lightning_attention.__module__.endswith(".lightning_naive")
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(
            model.generate(prompt, max_new_tokens=4, do_sample=False),
            reloaded.generate(prompt, max_new_tokens=4, do_sample=False),
        )


def test_cached_greedy_generate_matches_full_forwards(hybrid):
    _, model, _ = hybrid
    prompt = _prompts([9])[0][None]
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        seq = prompt
        for step_logits in out.logits:
            full = model(seq, use_cache=False).logits[:, -1]
            assert (full - step_logits).abs().max().item() <= 1e-4
            seq = torch.cat([seq, full.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)

    # O(1) per Lightning layer: the state and the conv tails do not grow with the context
    cache, cfg = out.past_key_values, model.config
    H, D, K = cfg.lightning_num_heads, cfg.lightning_head_dim, cfg.lightning_conv_size
    assert cache.get_seq_length() == seq.shape[1] - 1  # the last token was sampled, never fed
    for mixer, layer in zip(cfg.layer_pattern, cache.layers):
        if mixer == "L":
            assert layer.recurrent_state.shape == (1, H, D, D) and layer.recurrent_state.dtype == torch.float32
            assert layer.conv_state.shape == (1, K - 1, 3 * H * D)  # q, k and v side by side
        else:
            assert layer.keys.shape == (1, cfg.num_key_value_heads, seq.shape[1] - 1, cfg.head_dim)


def test_sampling_with_and_without_cache(hybrid):
    _, model, _ = hybrid
    prompt = _prompts([6])[0][None]
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=20, use_cache=use_cache))
    assert torch.equal(*runs)


# (c) ------------------------------------------------------------------------------------------------


def test_left_padded_batch_equals_single_prompts(hybrid):
    _, model, _ = hybrid
    prompts = _prompts([5, 9, 7])
    ids, mask = _left_pad(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kwargs)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], **kwargs)
            assert torch.equal(batch.sequences[i, ids.shape[1] :], single.sequences[0, len(p) :])
            diff = max((b[i] - s[0]).abs().max().item() for b, s in zip(batch.logits, single.logits))
            assert diff <= 1e-4


# (d) ------------------------------------------------------------------------------------------------


def test_chunked_prefill_matches_one_shot(hybrid):
    model, _, _ = hybrid
    ids, mask = _left_pad(_prompts([23, 17]))
    with torch.no_grad():
        one_shot = model(ids, attention_mask=mask)
        chunked = model(ids, attention_mask=mask, prefill_chunk_size=5)  # 5 does not divide 23
        assert chunked.past_key_values.get_seq_length() == 23
        assert (chunked.logits[:, -1] - one_shot.logits[:, -1]).abs().max().item() <= 1e-4
        assert (chunked.logits - one_shot.logits).abs().max().item() <= 1e-4

        # the chunk-built cache decodes on like the one-shot one
        nxt = one_shot.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        a = model(nxt, attention_mask=step_mask, past_key_values=one_shot.past_key_values).logits
        b = model(nxt, attention_mask=step_mask, past_key_values=chunked.past_key_values).logits
        assert (a - b).abs().max().item() <= 1e-4

    # the config field drives generate() the same way
    model.config.prefill_chunk_size = 4
    try:
        with torch.no_grad():
            chunked_gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    finally:
        model.config.prefill_chunk_size = None
    with torch.no_grad():
        assert torch.equal(chunked_gen, model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


# (e) ------------------------------------------------------------------------------------------------


def _hand_attention(attn, x, base):
    """The NoPE attention layer of docs/architecture.md written out; q_i scaled by log(i + a) / log(a) if a."""
    B, T, _ = x.shape
    D, G = attn.head_dim, attn.num_key_value_groups
    q = attn.q_norm(attn.q_proj(x).view(B, T, -1, D)).transpose(1, 2)  # [B, H, T, D]
    k = attn.k_norm(attn.k_proj(x).view(B, T, -1, D)).transpose(1, 2).repeat_interleave(G, dim=1)
    v = attn.v_proj(x).view(B, T, -1, D).transpose(1, 2).repeat_interleave(G, dim=1)
    if base is not None:
        q = q * torch.tensor([math.log(i + base) / math.log(base) for i in range(T)])[:, None]
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = F.softmax(scores, dim=-1) @ v
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("base", [2.0, 256.0])
def test_hype_query_scale(base):
    torch.manual_seed(0)
    config = HypeNetConfig(**SIZES, num_hidden_layers=1, attention_query_scale_base=base, initializer_range=0.2)
    model = _perturb(HypeNetForCausalLM(config))
    attn = model.model.layers[0].self_attn
    seen = {}
    attn.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 40)))
        expected, unscaled = _hand_attention(attn, seen["x"], base), _hand_attention(attn, seen["x"], None)
    assert (seen["out"] - expected).abs().max().item() <= 1e-5
    assert (seen["out"] - unscaled).abs().max().item() > 1e-3  # the scale is not a no-op at this length


# (f) ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_pattern="ALA"), "has 3 characters but num_hidden_layers=4"),
        (dict(layer_pattern="AXLA"), "may only contain 'A' and 'L'"),
        (dict(num_key_value_heads=3), "num_attention_heads=4 must be divisible by num_key_value_heads=3"),
        (dict(head_dim=None, hidden_size=66), "hidden_size=66 must be divisible by num_attention_heads=4"),
        (dict(lightning_scale="cubic"), "lightning_scale must be one of"),
        (dict(attention_query_scale_base=1.0), "attention_query_scale_base must be > 1"),
        (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
        (dict(lightning_head_dim=15), "RoPE needs an even lightning_head_dim"),
        (dict(lightning_conv_size=0), "lightning_conv_size must be a positive integer"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "plain RoPE only"),
        (dict(rope_theta=10_000.0, rope_parameters={"rope_theta": 500.0}), "disagrees"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _hybrid_config(**overrides)


def test_config_round_trip_keeps_rope_theta_and_rope_parameters(tmp_path):
    config = _hybrid_config(rope_theta=5000.0)
    config.save_pretrained(tmp_path)
    loaded = HypeNetConfig.from_pretrained(tmp_path)
    assert loaded.rope_theta == 5000.0 and loaded.rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}
    assert loaded.layer_pattern == "ALLA" and loaded.lightning_head_dim == 24


def test_iter_hf_tensors_round_trip_and_errors(hybrid, tmp_path):
    model, _, _ = hybrid
    out = write_hf_folder(tmp_path / "m", model.config, _export_state(model), max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = model.state_dict()
    read = dict(iter_hf_tensors(out))
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in read)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(iter_hf_tensors(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        next(iter_hf_tensors(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        next(iter_hf_tensors(tmp_path / "empty"))
    (out / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing shards \\['{shards[1]}'\\]"):
        next(iter_hf_tensors(out))


def test_write_hf_folder_is_atomic_and_checks_tensors(hybrid, tmp_path):
    model, _, _ = hybrid
    state = dict(_export_state(model))

    def interrupted():
        for i, item in enumerate(state.items()):
            if i == 5:
                raise KeyboardInterrupt  # a killed export
            yield item

    with pytest.raises(KeyboardInterrupt):
        write_hf_folder(tmp_path / "m", model.config, interrupted(), max_shard_bytes=1024)
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary sibling remain

    with pytest.raises(ValueError, match="tensors missing"):
        write_hf_folder(tmp_path / "m", model.config, list(state.items())[:-1])
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.linear_attn"):
        write_hf_folder(
            tmp_path / "m", model.config, [("model.layers.0.linear_attn.q_proj.weight", torch.zeros(48, 64))]
        )
    bad_shape = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match="has shape \\(3,\\)"):
        write_hf_folder(tmp_path / "m", model.config, bad_shape.items())
    assert os.listdir(tmp_path) == []

    write_hf_folder(tmp_path / "m", model.config, state.items())
    assert (tmp_path / "m" / "model.safetensors").is_file()  # below the shard size: one file, no index
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_hf_folder(tmp_path / "m", model.config, state.items())
    write_hf_folder(tmp_path / "m", model.config, state.items(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hypenet.HypeNetForCausalLM"
    assert config["layer_pattern"] == "ALLA" and config["attention_rope"] is False  # defaults written out too


# (g) ------------------------------------------------------------------------------------------------


def _tiny_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(directory)


@pytest.mark.parametrize("tied", [False, True])
def test_teacher_export_is_a_plain_qwen3_folder(tmp_path, tied):
    torch.manual_seed(0)
    qwen = _perturb(Qwen3ForCausalLM(Qwen3Config(**SIZES, num_hidden_layers=2, tie_word_embeddings=tied)))
    _tiny_tokenizer(tmp_path / "tok")
    teacher_generation = {"eos_token_id": [1, 2], "temperature": 0.7, "do_sample": True}
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps(teacher_generation))
    out = write_hf_folder(tmp_path / "teacher", qwen.config, _export_state(qwen), tokenizer_dir=tmp_path / "tok")
    assert not any(name.endswith(".py") for name in os.listdir(out))
    assert json.loads((out / "generation_config.json").read_text()) == teacher_generation  # the teacher's, kept
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    assert type(reloaded) is Qwen3ForCausalLM
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, qwen(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("w5 w7").input_ids == [5, 7]


# (h) inference paths: grouped attention without K/V copies, unmaterialised chunk masks, in-place decode state


def _repeated_kv_attention(q, k, v, mask):
    """The reference: K/V repeated per query head, the mask materialised as a bool tensor."""
    G = q.shape[1] // k.shape[1]
    T, S = q.shape[2], k.shape[2]
    if mask is None:  # causal where T == S, one query seeing every key where T == 1
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    elif not isinstance(mask, torch.Tensor):
        mask = mask._materialize(q.device)
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), attn_mask=mask, scale=0.3
    )


@pytest.mark.parametrize("T, S, mask_kind", [(1, 9, "bool"), (1, 9, None), (6, 6, None), (4, 11, "lower_right"),
                                             (4, 11, "bool")])
def test_grouped_attention_matches_repeated_kv(T, S, mask_kind):
    from torch.nn.attention.bias import CausalBias, causal_lower_right

    from megatron_hypenet.hf.modeling_hypenet import grouped_attention

    torch.manual_seed(0)
    B, H, G, D = 2, 6, 2, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, S, D), torch.randn(B, G, S, D)
    mask = None
    if mask_kind == "bool":  # causal, bottom-right aligned, and a padded first key in batch row 0
        mask = (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]).expand(B, 1, T, S).clone()
        mask[0, :, :, 0] = False
    elif mask_kind == "lower_right":
        mask = causal_lower_right(T, S)
        assert isinstance(mask, CausalBias)
    expected = _repeated_kv_attention(q, k, v, mask)
    assert (grouped_attention(q, k, v, mask, scale=0.3) - expected).abs().max().item() <= 1e-5


def test_unpadded_chunked_prefill_uses_an_unmaterialised_causal_bias(hybrid):
    from torch.nn.attention.bias import CausalBias

    from megatron_hypenet.hf.modeling_hypenet import _causal_mask

    assert isinstance(_causal_mask(None, 5, 10, "cpu"), CausalBias)  # a later chunk: bottom-right causal
    assert _causal_mask(None, 5, 0, "cpu") is None and _causal_mask(None, 1, 10, "cpu") is None
    model, _, _ = hybrid
    ids = torch.randint(1, VOCAB, (2, 23))
    with torch.no_grad():
        one_shot = model(ids).logits
        chunked = model(ids, prefill_chunk_size=5).logits  # no padding mask: chunks 2.. take the CausalBias
    assert (chunked - one_shot).abs().max().item() <= 1e-4


def test_decode_updates_conv_tails_in_place(hybrid):
    """A decode step writes the Lightning layers' conv tails into the tensors it found (a CUDA graph
    replays fixed addresses), with the values a fresh cache would hold."""
    model, _, _ = hybrid
    ids = torch.randint(1, VOCAB, (1, 9))
    with torch.no_grad():
        cache = model(ids[:, :8]).past_key_values
        lightning = [c for m, c in zip(model.config.layer_pattern, cache.layers) if m == "L"]
        before = [c.conv_state.data_ptr() for c in lightning]
        model(ids[:, 8:], past_key_values=cache)
        fresh = model(ids).past_key_values
    fresh_lightning = [c for m, c in zip(model.config.layer_pattern, fresh.layers) if m == "L"]
    for c, ptrs, f in zip(lightning, before, fresh_lightning):
        assert c.conv_state.data_ptr() == ptrs
        # fp32 projections of 1 and of 9 tokens round differently: 1.0e-6 measured (torch 2.13 CPU), O(1) if wrong
        assert torch.allclose(c.conv_state, f.conv_state, atol=1e-5)


@pytest.mark.parametrize("step_op", [True, False])  # the custom op (Triton on GPU), the PyTorch step inlined
def test_bench_decode_step_runs_gated_deltanet_layers_as_hf_does(monkeypatch, step_op):
    """A 'D' layer's decode step is the gated delta rule with its own a/b projections, A_log and dt_bias
    (the Lightning step there gave a relative logits error of ~1)."""
    import torch._dynamo

    from tools import bench_inference

    monkeypatch.setattr(bench_inference, "GATED_DELTA_TRITON_STEP", step_op)

    torch.manual_seed(0)
    model = _perturb(HypeNetForCausalLM(_hybrid_config(layer_pattern="DA", num_hidden_layers=2)))
    with torch.no_grad():  # away from init (zero a, b; fixed decay), so every one of them matters
        for name, p in model.named_parameters():
            if any(n in name for n in ("a_proj", "b_proj", "A_log", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.5)
    torch._dynamo.reset()  # traced as the GPU run's inductor would be (fullgraph, in-place state)
    error = bench_inference.check_against_hf(model, model, torch.device("cpu"), chunk=300, backend="aot_eager")
    assert error <= 1e-5


def test_bench_decode_step_compiles_once_per_layer_kind_and_matches_hf():
    """tools/bench_inference.py's decode step (the HF modules' project/output, static K/V, in-place
    states), traced by torch.compile (aot_eager: the tracing and functionalisation inductor gets), against
    the HF forward; dynamo must reuse one graph per layer kind, or the GPU run would compile per layer."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tools import bench_inference

    torch.manual_seed(0)
    model = _perturb(HypeNetForCausalLM(_hybrid_config(layer_pattern="LALLAL", num_hidden_layers=6)))
    torch._dynamo.reset()
    counters.clear()
    error = bench_inference.check_against_hf(model, model, torch.device("cpu"), chunk=300, backend="aot_eager")
    assert error <= 1e-5
    assert counters["stats"]["unique_graphs"] == 3  # a Lightning layer, an attention layer, the head
    result = bench_inference.measure(model, 2500, 1024, torch.device("cpu"), "aot_eager")  # a longer K/V buffer
    assert result["status"] == "ok" and counters["stats"]["unique_graphs"] == 3  # ... compiled for any length
