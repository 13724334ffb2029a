"""Settings from NVILA_QUANT_* variables: parsed and validated when first used, errors that name the variable and the
allowed values, assignments validated, overrides restored."""

from __future__ import annotations

import pytest

from nvila_quant.errors import ConfigError
from nvila_quant.kernels.cpu.settings import CpuSettings
from nvila_quant.kernels.cuda.settings import CudaSettings
from nvila_quant.kernels.settings import KernelSettings
from nvila_quant.model.static_decode import DecodeSettings
from nvila_quant.settings import Lazy, overrides


def test_defaults_and_values_from_the_environment() -> None:
    assert CpuSettings.from_env({}) == CpuSettings()
    s = CpuSettings.from_env({"NVILA_QUANT_CPU_DENSE_MIN_TOKENS": "16", "NVILA_QUANT_CPU_CHUNK_MB": "2.5",
                              "NVILA_QUANT_CPU_HUGE_PAGES": "0", "NVILA_QUANT_NO_NATIVE": "1",
                              "NVILA_QUANT_CPU_KERNEL": "torch", "NVILA_QUANT_CPU_AMX_MIN_TOKENS": ""})
    assert (s.dense_min_tokens, s.chunk_mb, s.huge_pages, s.no_native, s.kernel) == (16, 2.5, False, True, "torch")
    assert s.amx_min_tokens == 2  # empty: the default
    assert CudaSettings.from_env({"NVILA_QUANT_CUDA_MMA_WARPS": "8"}).mma_warps == 8
    assert KernelSettings.from_env({"NVILA_QUANT_BACKEND": "reference"}).backend == "reference"
    assert DecodeSettings.from_env({"NVILA_QUANT_DECODE": "static"}).mode == "static"


@pytest.mark.parametrize("cls,var,value,allowed", [
    (CpuSettings, "NVILA_QUANT_CPU_DENSE_MIN_TOKENS", "many", "an integer >= 0"),
    (CpuSettings, "NVILA_QUANT_CPU_DENSE_MIN_TOKENS", "2.5", "an integer >= 0"),
    (CpuSettings, "NVILA_QUANT_CPU_AMX_MIN_TOKENS", "-1", "an integer >= 0"),
    (CpuSettings, "NVILA_QUANT_CPU_HUGE_PAGES", "maybe", "0 or 1"),
    (CpuSettings, "NVILA_QUANT_CPU_KERNEL", "fast", "one of auto, torch"),
    (CudaSettings, "NVILA_QUANT_CUDA_MMA_WARPS", "4", "one of 0, 8, 16"),
    (CudaSettings, "NVILA_QUANT_CUDA_GEMM", "wmma", "one of dequant, fused"),
    (KernelSettings, "NVILA_QUANT_BACKEND", "gpu", "one of auto, cpu, cuda, reference"),
    (DecodeSettings, "NVILA_QUANT_DECODE", "eager", "one of auto, lean, graph, compiled, static, dynamic"),
])
def test_bad_values_name_the_variable_and_what_it_takes(cls: type, var: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as e:
        cls.from_env({var: value})
    assert str(e.value) == f"{var} must be {allowed}, got {value!r}"


def test_read_when_first_used_and_reloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = Lazy(CpuSettings)
    monkeypatch.setenv("NVILA_QUANT_CPU_DENSE_MIN_TOKENS", "bad")  # not read yet: no error
    with pytest.raises(ConfigError, match="NVILA_QUANT_CPU_DENSE_MIN_TOKENS must be an integer"):
        lazy()
    monkeypatch.setenv("NVILA_QUANT_CPU_DENSE_MIN_TOKENS", "7")
    assert lazy().dense_min_tokens == 7 and lazy() is lazy()
    monkeypatch.setenv("NVILA_QUANT_CPU_DENSE_MIN_TOKENS", "9")
    assert lazy().dense_min_tokens == 7  # read once
    assert lazy.reload().dense_min_tokens == 9


def test_assignments_are_validated_and_overrides_restored() -> None:
    s = CpuSettings()
    changed: list[str] = []
    s.changed = changed.append  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="NVILA_QUANT_CPU_VNNI_MAX_TOKENS must be an integer >= 0, got -3"):
        s.vnni_max_tokens = -3
    with overrides(s, vnni_max_tokens=8, chunk_mb=0) as t:
        assert t is s and (s.vnni_max_tokens, s.chunk_mb) == (8, 0)
    assert (s.vnni_max_tokens, s.chunk_mb) == (None, None)
    assert changed == ["vnni_max_tokens", "chunk_mb", "vnni_max_tokens", "chunk_mb"]
    with pytest.raises(TypeError, match="unknown CpuSettings fields \\['bogus'\\]"), overrides(s, bogus=1):
        pass
