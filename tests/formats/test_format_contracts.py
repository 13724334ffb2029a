"""The three formats' contracts, one function at a time: exact error messages (expected vs got), the exact
quantization_config blocks, the optional tensors (bias, zero points of symmetric weights) and the shared checks."""

from __future__ import annotations

import pytest
import torch

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats import autoawq, common, tinychat
from nvila_quant.formats import compressed_tensors as ct
from nvila_quant.numerics.bitpack import pack_dense_int32
from nvila_quant.numerics.qtensor import QTensor


def _raises(exc: type[BaseException], message: str, fn, *args, **kwargs) -> None:
    """``fn(*args)`` raises exactly ``exc`` (not a subclass' sibling) with exactly ``message``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc and str(info.value) == message


def _qt(n: int, k: int, group_size: int, symmetric: bool = False, dtype: torch.dtype = torch.float16,
        seed: int = 0) -> QTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return QTensor.from_float(w, 4, group_size, not symmetric, scale_dtype=dtype)


# ---------------------------------------------------------------------------------------------- common
def test_check_group_size() -> None:
    assert common.check_group_size("f", -1, 96) == 96 and common.check_group_size("f", 32, 96) == 32
    assert common.check_group_size("f", 1, 96) == 1 and common.check_group_size("f", 96, 96) == 96
    for g in (0, -2):
        _raises(ConfigError, f"f: group_size must be -1 (per channel) or a positive divisor of in_features, got {g}",
                common.check_group_size, "f", g, 96)
    _raises(ConfigError, "f: group_size must divide in_features (got in_features=96, group_size=64); use a divisor "
            "of in_features or -1 (per channel) for this layer", common.check_group_size, "f", 64, 96)


def test_check_bits_shape_and_symmetric_zero() -> None:
    common.check_bits("f", 4, (4,))
    _raises(ConfigError, "f packs only [2, 4]-bit weights, got bits=3", common.check_bits, "f", 3, (4, 2))
    assert common.check_shape("f", (3, 5)) == (3, 5) and common.check_shape("f", (1, 1)) == (1, 1)
    assert all(type(v) is int for v in common.check_shape("f", (torch.tensor(3), torch.tensor(5))))
    for shape in ((0, 5), (5, 0), (5,), (2, 3, 4)):
        _raises(ConfigError, f"f: expected a (out_features, in_features) shape with positive sizes, got {shape}",
                common.check_shape, "f", shape)
    common.symmetric_zero("f", torch.full((2, 3), 8), 4)
    common.symmetric_zero("f", torch.full((2, 3), 4), 3)
    bad = torch.full((2, 3), 8)
    bad[1, 2] = 7
    _raises(ValueError, "f: a symmetric QTensor must have zero == 8 everywhere", common.symmetric_zero, "f", bad, 4)
    _raises(ValueError, "f: a symmetric QTensor must have zero == 4 everywhere", common.symmetric_zero, "f",
            torch.full((1, 1), 8), 3)


def test_take_expect_and_bias() -> None:
    t = {"a": torch.zeros(2, 3, dtype=torch.int32), "b": torch.zeros(2, dtype=torch.float16)}
    assert common.take(t, "a", "m", "f") is t["a"]
    _raises(CheckpointError, "f module 'm' lacks tensor 'c' (has ['a', 'b'])", common.take, t, "c", "m", "f")
    assert common.take_packed(t, "a", torch.int32, "(X, Y)", "m", "f") is t["a"]
    _raises(CheckpointError, "m.a must be a 2-D int16 (X, Y) tensor, got torch.int32 (2, 3)", common.take_packed, t,
            "a", torch.int16, "(X, Y)", "m", "f")
    _raises(CheckpointError, "m.b must be a 2-D int32 (X, Y) tensor, got torch.float16 (2,)", common.take_packed, t,
            "b", torch.int32, "(X, Y)", "m", "f")
    _raises(CheckpointError, "m.b must be a 2-D int32 (X, Y) tensor, got torch.int32 (2,)", common.take_packed,
            {"b": torch.zeros(2, dtype=torch.int32)}, "b", torch.int32, "(X, Y)", "m", "f")
    _raises(CheckpointError, "g module 'm' lacks tensor 'x' (has [])", common.take, {}, "x", "m", "g")
    assert common.take_bias({}, 2, "m") is None
    bias = torch.zeros(2, dtype=torch.bfloat16)
    assert common.take_bias({"bias": bias}, 2, "m") is bias
    _raises(CheckpointError, "m.bias has shape (3,), expected (2,)", common.take_bias, {"bias": torch.zeros(3)}, 2, "m")
    _raises(CheckpointError, "m.bias has dtype torch.int32, expected one of ['torch.float16', 'torch.bfloat16', "
            "'torch.float32']", common.take_bias, {"bias": torch.zeros(2, dtype=torch.int32)}, 2, "m")
    common.expect(torch.zeros(2, 3), (2, 3), (torch.float32,), "w")
    _raises(CheckpointError, "w has shape (2, 3), expected (3, 2)", common.expect, torch.zeros(2, 3), (3, 2),
            (torch.float32,), "w")


# ---------------------------------------------------------------------------------------------- configs
def test_quantization_configs_exact() -> None:
    assert autoawq.quantization_config(4, 64, True, ("lm_head",)) == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["lm_head"]}
    assert tinychat.quantization_config(4, 128, False, ["lm_head", "x"]) == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv_fast",
        "modules_to_not_convert": ["lm_head", "x"]}
    assert type(autoawq.quantization_config(4, 64, True, ())["modules_to_not_convert"]) is list
    assert type(tinychat.quantization_config(4, 64, True, ())["modules_to_not_convert"]) is list
    group = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": 32, "strategy": "group", "dynamic": False,
             "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    assert ct.weights_args(8, 32, True) == group
    assert ct.weights_args(4, -1, False) == {**group, "num_bits": 4, "symmetric": False, "group_size": None,
                                             "strategy": "channel"}
    cfg = ct.quantization_config(4, 128, False, ("lm_head",), {"l.b": 32, "l.a": 64, "l.c": 32})

    def entry(targets, g):
        return {"targets": targets, "weights": ct.weights_args(4, g, False), "input_activations": None,
                "output_activations": None, "format": "pack-quantized"}

    assert cfg == {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": entry(["Linear"], 128), "group_1": entry(["l.b", "l.c"], 32),
                          "group_2": entry(["l.a"], 64)},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}}
    assert list(ct.quantization_config(4, -1, True, [])["config_groups"]) == ["group_0"]
    assert type(cfg["ignore"]) is list


# ---------------------------------------------------------------------------------------------- check / pack errors
def test_format_checks_exact_messages() -> None:
    autoawq.check(4, -1, (8, 24))
    _raises(ConfigError, "autoawq packs 8 output channels per int32: out_features must be a multiple of 8, got 12",
            autoawq.check, 4, 128, (12, 256))
    _raises(ConfigError, "autoawq packs only [4]-bit weights, got bits=3", autoawq.check, 3, 128, (16, 256))
    _raises(ConfigError, "autoawq: expected a (out_features, in_features) shape with positive sizes, got (0, 256)",
            autoawq.check, 4, 128, (0, 256))
    _raises(ConfigError, "autoawq: group_size must be -1 (per channel) or a positive divisor of in_features, got 0",
            autoawq.check, 4, 0, (8, 256))
    ct.check(1, 3, (1, 9))
    ct.check(8, -1, (5, 7))
    _raises(ConfigError, "compressed-tensors packs only [1, 2, 3, 4, 5, 6, 7, 8]-bit weights, got bits=0", ct.check,
            0, 8, (8, 64))
    _raises(ConfigError, "compressed-tensors: expected a (out_features, in_features) shape with positive sizes, "
            "got (8,)", ct.check, 4, 8, (8,))
    _raises(ConfigError, "compressed-tensors: group_size must divide in_features (got in_features=60, group_size="
            "16); use a divisor of in_features or -1 (per channel) for this layer", ct.check, 4, 16, (8, 60))
    tinychat.check(4, -1, (4, 64))
    for shape in ((6, 128), (8, 96)):
        _raises(ConfigError, "tinychat interleaves 4 output rows over 64-wide input stripes: needs out_features % 4 "
                f"== 0 and in_features % 64 == 0, got {shape}; use autoawq or compressed-tensors for this layer",
                tinychat.check, 4, 32, shape)
    _raises(ConfigError, "tinychat packs only [4]-bit weights, got bits=8", tinychat.check, 8, 64, (8, 128))
    _raises(ConfigError, "tinychat: expected a (out_features, in_features) shape with positive sizes, got (0, 64)",
            tinychat.check, 4, 64, (0, 64))
    _raises(ConfigError, "tinychat: group_size must be -1 (per channel) or a positive divisor of in_features, got -3",
            tinychat.check, 4, -3, (8, 128))
    assert [tinychat.padded_groups(g) for g in (0, 1, 7, 8, 9, 16, 17)] == [0, 8, 8, 8, 16, 16, 24]


def test_pack_refusals() -> None:
    qt = _qt(8, 128, 64)
    qt.scale[3, 1] = 0
    _raises(ConfigError, "tinychat stores zero points as -(scale * zero), which a zero scale loses; use autoawq",
            tinychat.pack, qt)
    sym = _qt(8, 64, 32, symmetric=True)
    sym.zero[0, 0] = 7
    _raises(ValueError, "compressed-tensors: a symmetric QTensor must have zero == 8 everywhere", ct.pack, sym)
    _raises(ConfigError, "autoawq packs 8 output channels per int32: out_features must be a multiple of 8, got 4",
            autoawq.pack, _qt(4, 64, 32))
    _raises(ConfigError, "tinychat interleaves 4 output rows over 64-wide input stripes: needs out_features % 4 == 0 "
            "and in_features % 64 == 0, got (8, 96); use autoawq or compressed-tensors for this layer", tinychat.pack,
            _qt(8, 96, 32))


# ---------------------------------------------------------------------------------------------- pack layouts
def test_pack_outputs_exact() -> None:
    qt = _qt(8, 128, 64, dtype=torch.bfloat16)
    a = autoawq.pack(qt)
    assert set(a) == {"qweight", "qzeros", "scales"} and a["scales"].is_contiguous()
    assert a["qweight"].shape == (128, 1) and a["qzeros"].shape == (2, 1) and torch.equal(a["scales"], qt.scale.t())
    c = ct.pack(qt)
    assert set(c) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
    assert c["weight_zero_point"].is_contiguous() and c["weight_zero_point"].shape == (1, 2)
    assert torch.equal(c["weight_zero_point"], pack_dense_int32(qt.zero.t(), 4).t())
    assert c["weight_shape"].dtype == torch.int64 and c["weight_shape"].tolist() == [8, 128]
    assert torch.equal(c["weight_scale"], qt.scale) and c["weight_scale"].dtype == torch.bfloat16
    assert set(ct.pack(_qt(8, 128, 64, symmetric=True))) == {"weight_packed", "weight_scale", "weight_shape"}
    t = tinychat.pack(qt)
    assert set(t) == {"qweight", "scales", "scaled_zeros"}
    assert t["scales"].dtype == t["scaled_zeros"].dtype == torch.bfloat16 and t["scales"].shape == (8, 8)
    assert torch.equal(t["scales"][:2], qt.scale.t()) and not t["scales"][2:].any() and not t["scaled_zeros"][2:].any()
    assert torch.equal(t["scaled_zeros"][:2], (-(qt.scale.float() * qt.zero.float())).to(torch.bfloat16).t())


def test_tinychat_layout_hand_computed() -> None:
    """One (4, 64) block: within each 32-wide chunk stored position p holds input column CHUNK_ORDER[p]; the 4 rows'
    reordered 64-value stripes are concatenated and cut into int16 words of 4 values, lowest nibble first: word j
    holds row j // 16, stored positions 4 * (j % 16) .. + 3."""
    n, k = 4, 64
    q = ((torch.arange(n).view(n, 1) * 5 + torch.arange(k).view(1, k) * 3) % 16).to(torch.uint8)
    words = tinychat._pack_q(q)
    assert words.shape == (1, 64) and words.dtype == torch.int16

    def col(p: int) -> int:
        return tinychat.CHUNK_ORDER[p % 32] + 32 * (p // 32)

    for j in range(64):
        expect = sum(int(q[j // 16, col(4 * (j % 16) + t)]) << (4 * t) for t in range(4))
        assert int(words[0, j]) & 0xFFFF == expect, j
    assert torch.equal(tinychat._unpack_q(words), q)
    assert tinychat.CHUNK_ORDER[:9] == (0, 8, 16, 24, 1, 9, 17, 25, 2)


# ---------------------------------------------------------------------------------------------- unpack
def test_autoawq_unpack_contract() -> None:
    qt = _qt(16, 128, 64, symmetric=True, dtype=torch.float32)
    qt.bias = torch.randn(16)
    t = {**autoawq.pack(qt), "bias": qt.bias}
    back = autoawq.unpack(t, 4, 64, True, "m")
    assert back.equal(qt) and back.q.is_contiguous() and back.scale.is_contiguous() and back.zero.is_contiguous()
    no_zeros = {k: v for k, v in t.items() if k != "qzeros"}
    sym = autoawq.unpack(no_zeros, 4, 64, True, "m")  # symmetric: qzeros may be absent, zero = 8
    assert sym.equal(qt) and sym.zero.dtype == torch.int32 and sym.zero.shape == (16, 2)
    _raises(CheckpointError, "m lacks 'qzeros', which asymmetric (zero_point=true) AWQ weights need", autoawq.unpack,
            no_zeros, 4, 64, False, "m")
    _raises(CheckpointError, "m: metadata group_size=48 does not fit qweight (128, 2): autoawq: group_size must "
            "divide in_features (got in_features=128, group_size=48); use a divisor of in_features or -1 (per "
            "channel) for this layer", autoawq.unpack, t, 4, 48, True, "m")
    _raises(CheckpointError, "m.scales (K/G, N) with K=128, G=128 has shape (2, 16), expected (1, 16)",
            autoawq.unpack, t, 4, -1, True, "m")
    _raises(CheckpointError, "m.qzeros (K/G, N/8) with K=128, G=64 has dtype torch.int64, expected one of "
            "['torch.int32']", autoawq.unpack, {**t, "qzeros": t["qzeros"].long()}, 4, 64, True, "m")
    _raises(CheckpointError, "m.qzeros (K/G, N/8) with K=128, G=64 has shape (1, 2), expected (2, 2)",
            autoawq.unpack, {**t, "qzeros": t["qzeros"][:1]}, 4, 64, True, "m")
    _raises(CheckpointError, "m.qweight must be a 2-D int32 (K, N/8) tensor, got torch.int16 (128, 2)",
            autoawq.unpack, {**t, "qweight": t["qweight"].to(torch.int16)}, 4, 64, True, "m")
    _raises(CheckpointError, "autoawq module 'm' lacks tensor 'scales' (has ['bias', 'qweight', 'qzeros'])",
            autoawq.unpack, {k: v for k, v in t.items() if k != "scales"}, 4, 64, True, "m")
    _raises(ConfigError, "autoawq packs only [4]-bit weights, got bits=8", autoawq.unpack, t, 8, 64, True, "m")
    _raises(CheckpointError, "m.bias has shape (8,), expected (16,)", autoawq.unpack, {**t, "bias": qt.bias[:8]}, 4,
            64, True, "m")
    assert autoawq.unpack(t, 4, 64, True).symmetric and not autoawq.unpack(t, 4, 64, False).symmetric


def test_compressed_tensors_unpack_contract() -> None:
    qt = _qt(13, 48, 16, symmetric=True, dtype=torch.float16)
    qt.bias = torch.randn(13).half()
    t = {**ct.pack(qt), "bias": qt.bias}
    back = ct.unpack(t, 4, 16, True, "m")
    assert back.equal(qt) and back.zero.dtype == torch.int32 and back.zero.shape == (13, 3)
    assert back.scale.is_contiguous() and back.zero.is_contiguous()
    asym = _qt(13, 48, 16, symmetric=False)
    ta = ct.pack(asym)
    assert ct.unpack(ta, 4, 16, False, "m").equal(asym)
    assert ct.unpack({**ta, "weight_shape": ta["weight_shape"].int()}, 4, 16, False, "m").equal(asym)
    _raises(CheckpointError, "m lacks 'weight_zero_point', which asymmetric weights need", ct.unpack, t, 4, 16,
            False, "m")
    for bad in (torch.tensor([13, 48, 1]), torch.tensor([13.0, 48.0])):
        _raises(CheckpointError, f"m.weight_shape must hold [out_features, in_features], got {bad.tolist()}",
                ct.unpack, {**t, "weight_shape": bad}, 4, 16, True, "m")
    _raises(CheckpointError, "m: metadata group_size=32 does not fit weight_shape [13, 48]: compressed-tensors: "
            "group_size must divide in_features (got in_features=48, group_size=32); use a divisor of in_features "
            "or -1 (per channel) for this layer", ct.unpack, t, 4, 32, True, "m")
    _raises(CheckpointError, "m.weight_packed (N, ceil(K*8/32)) for weight_shape [13, 48] has shape (13, 6), "
            "expected (13, 12)", ct.unpack, t, 8, 16, True, "m")
    _raises(CheckpointError, "m.weight_scale (N, K/G) with G=48 has shape (13, 3), expected (13, 1)", ct.unpack, t,
            4, -1, True, "m")
    _raises(CheckpointError, "m.weight_zero_point (ceil(N*4/32), K/G) has shape (1, 3), expected (2, 3)", ct.unpack,
            {**ta, "weight_zero_point": torch.zeros(1, 3, dtype=torch.int32)}, 4, 16, False, "m")
    _raises(CheckpointError, "compressed-tensors module 'm' lacks tensor 'weight_shape' (has ['weight_packed', "
            "'weight_scale', 'weight_zero_point'])", ct.unpack, {k: v for k, v in ta.items() if k != "weight_shape"},
            4, 16, False, "m")
    _raises(ConfigError, "compressed-tensors packs only [1, 2, 3, 4, 5, 6, 7, 8]-bit weights, got bits=9", ct.unpack,
            t, 9, 16, True, "m")
    _raises(CheckpointError, "m.bias has dtype torch.int64, expected one of ['torch.float16', 'torch.bfloat16', "
            "'torch.float32']", ct.unpack, {**t, "bias": torch.zeros(13, dtype=torch.int64)}, 4, 16, True, "m")
    sym3 = QTensor.from_float(torch.randn(5, 30, generator=torch.Generator().manual_seed(1)), 3, 10, False)
    back3 = ct.unpack(ct.pack(sym3), 3, 10, True, "m")  # 3-bit symmetric: zero points 4, none stored
    assert back3.equal(sym3) and back3.zero.unique().tolist() == [4] and "weight_zero_point" not in ct.pack(sym3)


def test_tinychat_unpack_contract() -> None:
    qt = _qt(8, 128, 64, dtype=torch.float16)
    qt.bias = torch.randn(8).half()
    t = {**tinychat.pack(qt), "bias": qt.bias}
    back = tinychat.unpack(t, 4, 64, False, "m")
    assert back.equal(qt) and back.zero.dtype == torch.int32 and back.scale.is_contiguous()
    assert tinychat.unpack(t, 4, 64, True, "m").symmetric
    _raises(CheckpointError, "m: metadata (bits=4, group_size=48) does not fit qweight (2, 128): tinychat: "
            "group_size must divide in_features (got in_features=128, group_size=48); use a divisor of in_features "
            "or -1 (per channel) for this layer", tinychat.unpack, t, 4, 48, False, "m")
    short = {**t, "scales": t["scales"][:4], "scaled_zeros": t["scaled_zeros"][:4]}
    _raises(CheckpointError, "m.scales (Gp, N) with 2 groups padded to 8 has shape (4, 8), expected (8, 8)",
            tinychat.unpack, short, 4, 64, False, "m")
    _raises(CheckpointError, "m.scaled_zeros (Gp, N) has dtype torch.float32, expected one of ['torch.float16']",
            tinychat.unpack, {**t, "scaled_zeros": t["scaled_zeros"].float()}, 4, 64, False, "m")
    _raises(CheckpointError, "m.qweight must be a 2-D int16 (N/4, K) tensor, got torch.int32 (2, 128)",
            tinychat.unpack, {**t, "qweight": t["qweight"].int()}, 4, 64, False, "m")
    zero_scale = t["scales"].clone()
    zero_scale[1, 5] = 0
    _raises(CheckpointError, "m.scales has zeros: the zero points cannot be recovered from scaled_zeros",
            tinychat.unpack, {**t, "scales": zero_scale}, 4, 64, False, "m")
    padded = t["scales"].clone()
    padded[5] = 0  # zeros in the padding rows are expected
    assert tinychat.unpack({**t, "scales": padded}, 4, 64, False, "m").equal(qt)
    msg = "m.scaled_zeros is not -(scale * zero) with integer zero points in [0, 15]"
    for zero in (-1, 16):  # integral, out of range
        sz = t["scaled_zeros"].clone()
        sz[0, 0] = -t["scales"][0, 0] * zero
        _raises(CheckpointError, msg, tinychat.unpack, {**t, "scaled_zeros": sz}, 4, 64, False, "m")
    for zero in (0, 15):
        sz = t["scaled_zeros"].clone()
        sz[0, 0] = -t["scales"][0, 0] * zero
        assert tinychat.unpack({**t, "scaled_zeros": sz}, 4, 64, False, "m").zero[0, 0] == zero
    off = t["scaled_zeros"].clone()
    off[:2] -= 0.2 * t["scales"][:2]  # within the 0.25 tolerance: rounds back
    assert tinychat.unpack({**t, "scaled_zeros": off}, 4, 64, False, "m").equal(qt)
    unit = QTensor(qt.q, torch.ones_like(qt.scale), torch.full_like(qt.zero, 3), 4, 64)
    tu = tinychat.pack(unit)
    edge = tu["scaled_zeros"].clone()
    edge[0, 0] = -3.25  # exactly 0.25 off (scale 1, exact in fp16): still accepted, rounds to 3
    assert tinychat.unpack({**tu, "scaled_zeros": edge}, 4, 64, False, "m").equal(unit)
    edge[0, 0] = -3.3125  # beyond
    _raises(CheckpointError, msg, tinychat.unpack, {**tu, "scaled_zeros": edge}, 4, 64, False, "m")
    _raises(CheckpointError, "m.bias has shape (4,), expected (8,)", tinychat.unpack, {**t, "bias": qt.bias[:4]}, 4,
            64, False, "m")
    _raises(ConfigError, "tinychat packs only [4]-bit weights, got bits=2", tinychat.unpack, t, 2, 64, False, "m")
    per_channel = _qt(4, 64, -1, dtype=torch.bfloat16)
    assert tinychat.unpack(tinychat.pack(per_channel), 4, -1, False).equal(per_channel)


def test_missing_packed_weight_default_module_name() -> None:
    """Without a module name the errors say '?'; the packed weight itself is looked up with the format's name."""
    _raises(CheckpointError, "autoawq module '?' lacks tensor 'qweight' (has [])", autoawq.unpack, {}, 4, 128, False)
    _raises(CheckpointError, "tinychat module '?' lacks tensor 'qweight' (has ['scales'])", tinychat.unpack,
            {"scales": torch.ones(8, 8)}, 4, 128, False)
    _raises(CheckpointError, "compressed-tensors module '?' lacks tensor 'weight_shape' (has [])", ct.unpack, {}, 4,
            128, False)
    t = ct.pack(_qt(8, 64, 32))
    _raises(CheckpointError, "compressed-tensors module 'm' lacks tensor 'weight_packed' (has ['weight_scale', "
            "'weight_shape', 'weight_zero_point'])", ct.unpack, {k: v for k, v in t.items() if k != "weight_packed"},
            4, 32, False, "m")
    _raises(CheckpointError, "compressed-tensors module 'm' lacks tensor 'weight_scale' (has ['weight_packed', "
            "'weight_shape', 'weight_zero_point'])", ct.unpack, {k: v for k, v in t.items() if k != "weight_scale"},
            4, 32, False, "m")
    tc = tinychat.pack(_qt(8, 128, 64))
    _raises(CheckpointError, "tinychat module 'm' lacks tensor 'scales' (has ['qweight', 'scaled_zeros'])",
            tinychat.unpack, {k: v for k, v in tc.items() if k != "scales"}, 4, 64, False, "m")
    _raises(CheckpointError, "tinychat module 'm' lacks tensor 'scaled_zeros' (has ['qweight', 'scales'])",
            tinychat.unpack, {k: v for k, v in tc.items() if k != "scaled_zeros"}, 4, 64, False, "m")


def test_unpacked_dtypes_and_devices() -> None:
    """q is uint8 and zero int32 in every format (QTensor.equal compares values only); the tensors unpack on the
    packed tensors' device ("meta" here: shapes and dtypes without data)."""
    for fmt, mod, qt in (("autoawq", autoawq, _qt(8, 128, 64)), ("compressed-tensors", ct, _qt(8, 128, 64)),
                         ("tinychat", tinychat, _qt(8, 128, 64))):
        for symmetric in (False, True):
            packed = mod.pack(qt if not symmetric else _qt(8, 128, 64, symmetric=True))
            back = mod.unpack(packed, 4, 64, symmetric, "m")
            assert (back.q.dtype, back.zero.dtype) == (torch.uint8, torch.int32), (fmt, symmetric)
    meta = QTensor(torch.zeros(8, 128, dtype=torch.uint8, device="meta"),
                   torch.ones(8, 2, dtype=torch.float16, device="meta"),
                   torch.full((8, 2), 8, dtype=torch.int32, device="meta"), 4, 64)  # packs as asymmetric
    for mod, drop in ((autoawq, "qzeros"), (ct, "weight_zero_point")):
        packed = {k: v for k, v in mod.pack(meta).items() if k != drop}  # read as symmetric: zeros made on unpack
        back = mod.unpack(packed, 4, 64, True, "m")
        assert all(t.device.type == "meta" for t in (back.q, back.scale, back.zero)), mod.NAME
        assert back.zero.dtype == torch.int32 and back.q.dtype == torch.uint8 and back.zero.shape == (8, 2)
    words = tinychat._pack_q(meta.q)
    assert words.device.type == "meta" and words.dtype == torch.int16 and words.shape == (2, 128)
    q = tinychat._unpack_q(words)
    assert q.device.type == "meta" and q.dtype == torch.uint8 and q.shape == (8, 128)


def test_tinychat_unit_scales_pack() -> None:
    """Only a zero scale is refused: a scale of exactly 1 (or any other) packs and round-trips."""
    qt = QTensor(torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8),
                 torch.ones(8, 1, dtype=torch.float16), torch.full((8, 1), 3, dtype=torch.int32), 4, -1)
    assert tinychat.unpack(tinychat.pack(qt), 4, -1, False).equal(qt)


@pytest.mark.cuda
def test_formats_pack_and_unpack_on_the_gpu() -> None:
    """Packed tensors are made on the QTensor's device and unpack on theirs (no silent copies to the CPU)."""
    for mod in (autoawq, ct, tinychat):
        for symmetric in (False, True):
            qt = _qt(8, 128, 64, symmetric=symmetric)
            packed = mod.pack(qt.to("cuda"))
            assert all(v.device.type == "cuda" for k, v in packed.items() if k != "weight_shape"), mod.NAME
            if symmetric:
                packed = {k: v for k, v in packed.items() if k not in ("qzeros", "weight_zero_point")}
            back = mod.unpack(packed, 4, 64, symmetric, "m")
            assert all(t.device.type == "cuda" for t in (back.q, back.scale, back.zero)), mod.NAME
            assert back.to("cpu").equal(qt), mod.NAME
