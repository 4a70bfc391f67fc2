"""GGUF files written by the tests with gguf.GGUFWriter: every supported quant type dequantizes
like gguf's reference, tiny Llama and Qwen3 models give the same greedy tokens from GGUF as from
safetensors, and bad files get errors that name the problem."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Quant
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

import rayk
from rayk.model.gguf_file import GGUFFile
from rayk.model.gguf_loader import dequantize_tensor
from tests.conftest import VOCAB_SIZE, random_prompts

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (the loader must undo it)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, arch_name: str, config: dict, state: dict[str, torch.Tensor], **overrides) -> None:
    """A GGUF file of a Hugging Face checkpoint, the way llama.cpp's converter lays it out."""
    writer = gguf.GGUFWriter(str(path), overrides.pop("architecture", arch_name))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    for name, tensor in state.items():
        values = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gguf_name = f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"
            if arch_name == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config["num_attention_heads"] if module == "self_attn.q_proj" else config["num_key_value_heads"]
                values = _llama_cpp_permute(values, heads)
        values = overrides.get(gguf_name, values)
        if isinstance(values, tuple):  # (raw bytes, their quant type), written as they are
            raw, quant = values
            writer.add_tensor(gguf_name, raw, raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_checkpoint(request, tmp_path_factory):
    """A tiny random model saved both ways (default RoPE: GGUF's llama3 factors are unsupported)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5, bos_token_id=None, eos_token_id=None)
    if request.param == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, tie_word_embeddings=True))
    directory = tmp_path_factory.mktemp(f"tiny_{request.param}_both")
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    state = load_file(str(directory / "model.safetensors"))
    write_gguf(directory.parent / f"{request.param}.gguf", request.param, config, state)
    return request.param, directory, directory.parent / f"{request.param}.gguf", config, state


def test_tiny_models_give_the_same_greedy_tokens_from_gguf_as_from_safetensors(tiny_checkpoint):
    _, safetensors_dir, gguf_file, _, _ = tiny_checkpoint
    prompts = random_prompts((3, 17, 40), seed=13)
    params = rayk.SamplingParams(temperature=0, max_tokens=10)
    from_safetensors = [o.token_ids for o in rayk.LLM(str(safetensors_dir)).generate(prompts, params)]
    from_gguf = rayk.LLM(str(gguf_file))
    assert [o.token_ids for o in from_gguf.generate(prompts, params)] == from_safetensors
    assert from_gguf.engine.tokenizer is None  # written without tokenizer metadata


def test_every_supported_quant_type_dequantizes_like_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 512)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "quants.gguf"), "llama")
    for kind in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"):
        quant = Quant[kind]
        writer.add_tensor(kind, quantize(values, quant), raw_dtype=quant)
    for kind in ("Q4_K", "Q5_K", "Q6_K"):
        # gguf cannot quantize k-quants; any bytes of the right size are valid blocks to decode.
        block_size, type_size = gguf.GGML_QUANT_SIZES[Quant[kind]]
        raw = rng.integers(0, 256, size=(4, 512 // block_size * type_size), dtype=np.uint8)
        writer.add_tensor(kind, raw, raw_dtype=Quant[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = gguf.GGUFReader(str(tmp_path / "quants.gguf"))  # gguf's own parser and decoder
    ours = GGUFFile(tmp_path / "quants.gguf")
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    assert sorted(t.name for t in ours.tensors) == sorted(("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"))
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.quant == theirs.tensor_type.name == mine.name
        assert (mine.offset, mine.nbytes, mine.shape) == (theirs.data_offset, theirs.n_bytes, (4, 512))
        values = dequantize_tensor(ours, mine)
        assert values.shape == (4, 512) and values.dtype == torch.float32
        np.testing.assert_array_equal(values.numpy(), dequantize(theirs.data, theirs.tensor_type).reshape(4, 512), err_msg=mine.name)


def test_bad_gguf_models_name_the_problem(tiny_checkpoint, tmp_path):
    arch_name, _, _, config, state = tiny_checkpoint
    write_gguf(tmp_path / "arch.gguf", arch_name, config, state, architecture="gemma")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
        rayk.LLM(str(tmp_path / "arch.gguf"))
    narrow = state["model.norm.weight"].numpy()[:-1]
    write_gguf(tmp_path / "shape.gguf", arch_name, config, state, **{"output_norm.weight": narrow})
    with pytest.raises(ValueError, match=r"output_norm.weight has shape \(63,\), the metadata implies \(64,\)"):
        rayk.LLM(str(tmp_path / "shape.gguf"))


def test_an_unsupported_quant_type_is_named(tmp_path, tiny_checkpoint):
    arch_name, _, _, config, state = tiny_checkpoint
    block, size = gguf.GGML_QUANT_SIZES[Quant.Q5_0]  # a real type, not among rayk's supported ones
    raw = np.zeros((config["hidden_size"] // block * size,), dtype=np.uint8)
    write_gguf(tmp_path / "q5_0.gguf", arch_name, config, state, **{"output_norm.weight": (raw, Quant.Q5_0)})
    with pytest.raises(ValueError, match="output_norm.weight is Q5_0, not one of the supported types"):
        rayk.LLM(str(tmp_path / "q5_0.gguf"))


def test_a_converted_copy_serves_later_loads_with_the_same_weights(tiny_checkpoint, tmp_path):
    from rayk.model.loader import load_model

    _, _, gguf_file, _, _ = tiny_checkpoint
    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    assert not load_model(gguf_file, torch.bfloat16, cpu, cache).from_cache
    assert not cache.exists() or not any(cache.iterdir())  # a 16-bit load leaves no copy
    first = load_model(gguf_file, torch.float32, cpu, cache)
    first.cache_write.join()  # written in the background while the first model serves
    second = load_model(gguf_file, torch.float32, cpu, cache)
    assert not first.from_cache and second.from_cache and second.cache_write is None
    assert second.weights_identity == first.weights_identity
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    assert sorted(p.name for p in cache.iterdir()) == [entry.name, f"{entry.name}.lock"]  # no staging left
    (entry / "meta.json").write_text("{not json")
    rebuilt = load_model(gguf_file, torch.float32, cpu, cache)
    rebuilt.cache_write.join()
    assert not rebuilt.from_cache and load_model(gguf_file, torch.float32, cpu, cache).from_cache
