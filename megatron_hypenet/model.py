"""HypeNet layer specs and model construction on megatron-core's GPTModel.

`layer_spec(config, mixer)` is the one place that says which module fills each slot of a
`TransformerLayer`; swapping an implementation (a TE linear, another RNN mixer) means changing a
`ModuleSpec` here, not the model code.
"""

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from .config import ATTENTION, GATED_DELTA, LIGHTNING, HypeNetConfig
from .layers import (
    GatedDeltaNet,
    HypeNetAttention,
    LightningAttention,
    MixerSubmodules,
    RMSNorm,
    RowParallelLinear,
    checkpoint_under_forward_autocast,
)

# megatron-core's own recomputation (full layers, selective "mlp") goes through tensor_parallel.checkpoint:
# give it back the forward's autocast state too (see checkpoint_under_forward_autocast).
tensor_parallel.checkpoint = checkpoint_under_forward_autocast

VOCAB_DIVISIBLE_BY = 128  # padded vocab stays divisible by every TP size up to 128, so checkpoints reshard


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_DIVISIBLE_BY) * VOCAB_DIVISIBLE_BY


MIXERS = {
    ATTENTION: ModuleSpec(
        module=HypeNetAttention,
        submodules=MixerSubmodules(linear_qkv=ColumnParallelLinear, linear_proj=RowParallelLinear),
    ),
    LIGHTNING: ModuleSpec(
        module=LightningAttention,
        submodules=MixerSubmodules(
            linear_qkv=ColumnParallelLinear, linear_proj=RowParallelLinear, linear_gate=ColumnParallelLinear
        ),
    ),
    GATED_DELTA: ModuleSpec(
        module=GatedDeltaNet,
        submodules=MixerSubmodules(
            linear_qkv=ColumnParallelLinear, linear_proj=RowParallelLinear, linear_gate=ColumnParallelLinear,
            linear_a=ColumnParallelLinear, linear_b=ColumnParallelLinear,
        ),
    ),
}


def layer_spec(mixer: str) -> ModuleSpec:
    """A Qwen3 decoder layer whose token mixer is `mixer` ("A", "L" or "D")."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=MIXERS[mixer],
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config: HypeNetConfig, vp_stage=None) -> TransformerBlockSubmodules:
    """The layer specs of this pipeline stage, taken from the global layer pattern."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    pattern = config.layer_pattern[offset : offset + count]
    return TransformerBlockSubmodules(layer_specs=[layer_spec(m) for m in pattern], layer_norm=RMSNorm)


def build_model(config: HypeNetConfig, vocab_size: int, tie_word_embeddings: bool, max_sequence_length: int = 1 << 20,
                vp_stage=None) -> GPTModel:
    """A HypeNet (or, with the teacher's pattern, Qwen3) GPTModel for this rank's pipeline stage."""
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, vp_stage),
        vocab_size=padded_vocab_size(vocab_size),
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=tie_word_embeddings,
        position_embedding_type="none",
        vp_stage=vp_stage,
    )
    model.vocab_size = vocab_size  # logits beyond it are padding
    if config.attention_twins:
        # beside the layer's own mixer, outside its forward: only the align step calls it. A child module, so
        # the layer's sharded_state_dict saves it under decoder.layers.<global number>.attention_twin.
        for layer in model.decoder.layers:
            layer.attention_twin = build_module(MIXERS[ATTENTION], config=config, layer_number=layer.layer_number)
    return model


def compile_layers(model: GPTModel) -> None:
    """torch.compile each decoder layer in place (torchtitan's per-block granularity). Not the whole model: the
    stages call its embedding and decoder, not its forward (halo.stages.forward_hidden). Layers of one kind share
    their compiled graphs (on CPU, 12 layers compiled once, plus once for the first layer's input strides).

    A distill process compiles several kinds of layer per function (student RNN and attention layers in fp32, the
    teacher's in bf16, each also under --cuda-graph's cache-free autocast): past dynamo's default of 8 graphs per
    function the rest would silently run eager (seen on an H100), hence the higher limit.

    Static shapes (dynamic=False): a stage's shapes are fixed, and a layer that meets a second shape (a later
    stage in the same process, at another length or micro-batch) would otherwise recompile with symbolic sizes,
    which inductor cannot lower for Gated DeltaNet's chunked code ("cannot determine truth value of Relational",
    a recipe's ablation worker on CPU). A new shape costs one more static compile instead."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.decoder.layers:
        layer.compile(dynamic=False)
