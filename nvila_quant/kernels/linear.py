"""``QuantLinear``: a drop-in ``nn.Linear`` holding group-quantized weights, and its backend choice.

Stored buffers (the runtime layout, not an on-disk format; N = out_features, K = in_features):
    q:     (N, K/2) uint8 nibble rows (low nibble = even k) for 4-bit weights with even K, else (N, K) uint8.
           The same bytes take a kernel's layout when prepared for it (``q_layout``): T16 on CPU (kernels/cpu/layout.py)
           for activations a T16 kernel takes, "mma" on CUDA (kernels/cuda/layout.py); state dicts, ``qtensor()``,
           copies and device moves always see nibble rows.
    scale: (N, K/G) float (the checkpoint's scale dtype)
    zero:  (N, K/G) uint8
    bias:  (N,) float or None
w = (q - zero) * scale. Kernel-specific repacks are built once per device by :meth:`QuantLinear.prepare`
(lazily on first use), never stored in a state dict.

Backends (``backend`` attribute, default "auto" = the fast one for the input's device):
    "cpu"       native AVX-512 int4 kernels: on LLM-shaped layers one T16 kernel for every token count (bf16
                dot products, or exact fp32 weights for fp32 activations); otherwise fused kernels for few tokens
                and dequantize + dense matmul for many; torch's int4 op where the native kernels cannot build
                (kernels/cpu/dispatch.py)
    "cuda"      the project's W4A16 kernels (kernels/cuda): a tensor-core skinny GEMM on the mma layout for up to
                32 tokens (other shapes: a GEMV for up to 4), a dequantize kernel + cuBLAS for more; fp16/bf16
                activations
    "reference" dequantize (exact fp32 (q - z) * s, cast to the activation dtype) + F.linear: the oracle
A fast backend that cannot run a layer (bits, shape, group size, dtype) falls back to "reference" and logs
the reason once per reason.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from nvila_quant.kernels.cpu import dispatch as cpu_backend
from nvila_quant.kernels.cpu.layout import t16_pack, t16_unpack
from nvila_quant.kernels.cpu.native import dequantize_nibbles
from nvila_quant.kernels.cuda import dispatch as cuda_backend
from nvila_quant.kernels.cuda.layout import mma_pack, mma_unpack
from nvila_quant.kernels.settings import BACKENDS
from nvila_quant.numerics.nibbles import pack_nibbles, unpack_nibbles
from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.numerics.quantizer import dequantize

__all__ = ["BACKENDS", "QuantLinear", "log_once"]

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()
# nn.Module's global hook registries (private; registering and removing hooks mutates these dicts in place), which
# QuantLinear.__call__'s shortcut checks; None (no shortcut) where a torch version lacks one.
_HOOK_NAMES = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
               "_global_backward_pre_hooks")
_GLOBAL_HOOKS = (tuple(getattr(_module, name) for name in _HOOK_NAMES)
                 if all(hasattr(_module, name) for name in _HOOK_NAMES) else None)


def log_once(message: str) -> None:
    """Log a fallback reason once per process."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W group-quantized (see module docstring). x: (..., K) -> (..., N)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = True, symmetric: bool = False, scale_dtype: torch.dtype = torch.float16,
                 backend: str = "auto") -> None:
        super().__init__()
        g = in_features if group_size == -1 else group_size
        if g <= 0 or in_features % g:
            raise ValueError(f"group_size must divide in_features (got in_features={in_features}, "
                             f"group_size={group_size})")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._backend_for: dict[tuple[str, torch.dtype], str] = {}  # (device type, x dtype) -> resolved backend
        # CPU: native kernels bound to this layer per dtype (eager fast path)
        self._bound: dict[torch.dtype, object] = {}
        self.backend = backend
        self.nibbles = bits == 4 and in_features % 2 == 0
        cols = in_features // 2 if self.nibbles else in_features
        self.register_buffer("q", torch.zeros(out_features, cols, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // g, dtype=scale_dtype))
        self.register_buffer("zero", torch.zeros(out_features, in_features // g, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype) if bias else None)
        self._prepared: dict[str, object] = {}
        self.q_layout = "rows"  # or "t16" (CPU kernels, bf16/fp16 activations) or "mma" (CUDA kernels)
        self._rows_only = False  # set when T16 weights meet activations no T16 kernel takes: stay in nibble rows

    # ------------------------------------------------------------------ conversion
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        self.settings_changed()

    @property
    def group(self) -> int:
        """The effective group size (in_features when group_size == -1)."""
        return self.in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_qtensor(cls, qt: QTensor, backend: str = "auto", dtype: torch.dtype | None = None) -> QuantLinear:
        """Build from the canonical form; ``dtype`` casts scale and bias (default: keep them)."""
        n, k = qt.q.shape
        scale = qt.scale if dtype is None else qt.scale.to(dtype)
        mod = cls(k, n, qt.bits, qt.group_size, qt.bias is not None, qt.symmetric, scale.dtype, backend)
        mod.load_qtensor(qt, dtype)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                    backend: str = "auto") -> QuantLinear:
        """Round-to-nearest quantize an nn.Linear (scale and bias keep the weight's dtype)."""
        bias = None if linear.bias is None else linear.bias.detach()
        qt = QTensor.from_float(linear.weight.detach(), bits, group_size, zero_point, bias=bias)
        return cls.from_qtensor(qt, backend)

    @torch.no_grad()
    def load_qtensor(self, qt: QTensor, dtype: torch.dtype | None = None) -> None:
        expect = (self.out_features, self.in_features, self.bits, self.group_size, self.bias is not None)
        got = (qt.out_features, qt.in_features, qt.bits, qt.group_size, qt.bias is not None)
        if expect != got:
            raise ValueError(f"QTensor (N, K, bits, group_size, has bias) = {got} does not fit this layer's {expect}")
        if int(qt.zero.max()) > 255 or int(qt.zero.min()) < 0:
            raise ValueError("zero points must lie in [0, 255]")
        device = self.q.device
        self.q = (pack_nibbles(qt.q) if self.nibbles else qt.q.contiguous()).to(device)
        self.q_layout = "rows"
        self.scale = (qt.scale if dtype is None else qt.scale.to(dtype)).contiguous().to(device)
        self.zero = qt.zero.to(torch.uint8).contiguous().to(device)
        self.symmetric = qt.symmetric
        if qt.bias is not None:
            self.bias = (qt.bias if dtype is None else qt.bias.to(dtype)).to(device)
        self._prepared.clear()
        self.settings_changed()

    def nibble_rows(self) -> torch.Tensor:
        """q as nibble rows (N, K/2) whatever the current layout (a new tensor unless it is "rows")."""
        return _UNPACK[self.q_layout](self.q)

    def _set_layout(self, layout: str) -> None:
        if layout != self.q_layout:
            with torch.inference_mode(False):  # a normal buffer even when first prepared under inference_mode
                self.q = _PACK[layout](self.nibble_rows())
            self.q_layout = layout
            self._prepared.clear()
            self.settings_changed()

    def qtensor(self) -> QTensor:
        """The canonical form (bit exact with what was loaded)."""
        q = unpack_nibbles(self.nibble_rows()) if self.nibbles else self.q
        return QTensor(q.clone(), self.scale.clone(), self.zero.to(torch.int32), self.bits, self.group_size,
                       self.symmetric, None if self.bias is None else self.bias.clone())

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, K) weight: (q - z) * s computed in fp32, rounded once to ``dtype`` (default: scale dtype)."""
        dtype = dtype or self.scale.dtype
        if self.nibbles and self.q.device.type == "cpu":
            w = dequantize_nibbles(self.nibble_rows(), self.scale, self.zero, self.group, torch.float32)
        else:
            w = dequantize(unpack_nibbles(self.nibble_rows()) if self.nibbles else self.q, self.scale.float(),
                           self.zero, self.group)
        return w.to(dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (nn.Module signature)
        self._set_layout("rows")  # kernel layouts are the kernels' business: devices and casts see nibble rows
        self._prepared.clear()  # repacks are per device and dtype
        self.settings_changed()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 (nn.Module signature)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.q_layout != "rows":
            destination[prefix + "q"] = self.nibble_rows()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "q" in state_dict:  # nibble rows were copied into q
            self.q_layout = "rows"
            self._prepared.clear()
            self.settings_changed()

    def __getstate__(self) -> dict:
        """Copies and pickles carry the weights as nibble rows, not the kernel caches (they hold native pointers)."""
        state = self.__dict__.copy()
        state.update(_prepared={}, _backend_for={}, _bound={}, q_layout="rows")
        state["_buffers"] = {**self._buffers, "q": self.nibble_rows()}
        return state

    def settings_changed(self) -> None:
        """Forget the per-(device, dtype) backend choices (re-decided on the next call)."""
        self._backend_for.clear()
        self._bound.clear()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}")

    # ------------------------------------------------------------------ backends
    def unsupported_reason(self, backend: str, x_dtype: torch.dtype | None = None) -> str | None:
        """None when ``backend`` can run this layer (for activations of ``x_dtype``), else why not."""
        if backend == "reference":
            return None
        if backend == "cpu":
            return cpu_backend.cpu_support(self.bits, self.group, self.out_features, self.in_features, x_dtype)
        if backend == "cuda":
            return cuda_backend.cuda_support(self.bits, self.group, self.out_features, self.in_features, x_dtype)
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def resolve_backend(self, device: torch.device, x_dtype: torch.dtype | None = None) -> str:
        """The backend a call on ``device`` with ``x_dtype`` activations takes (after fallbacks)."""
        wanted = self.backend
        if wanted == "auto":
            wanted = "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
        if wanted != "reference" and wanted != device.type:
            log_once(f"QuantLinear: backend {wanted!r} cannot run on {device.type} tensors; using 'reference'")
            return "reference"
        reason = self.unsupported_reason(wanted, x_dtype)
        if reason is not None:
            log_once(f"QuantLinear: {wanted} backend unsupported ({reason}); using 'reference' for such layers")
            return "reference"
        return wanted

    def prepare(self, backend: str | None = None, x_dtype: torch.dtype | None = None) -> str:
        """Build the kernel repack for ``backend`` (default: the one for this module's device) now. ``x_dtype``: the
        activations' dtype, when known (the CPU kernels' weight layout depends on it); calls with such activations
        then skip the backend resolution (and trace without a graph break under ``torch.compile``)."""
        backend = backend or self.resolve_backend(self.q.device, x_dtype)
        if backend == "cpu" and x_dtype is not None and self.nibbles:  # the T16 layout where a T16 kernel runs
            t16 = not self._rows_only and cpu_backend.t16_wanted(self.bits, self.out_features, self.in_features,
                                                                  self.group, x_dtype)
            if not t16 and self.q_layout == "t16":
                # activations with no T16 kernel here: stay in rows (no repacking back and forth)
                self._rows_only = True
            self._set_layout("t16" if t16 else "rows")
        if backend == "cpu" and "cpu" not in self._prepared:
            self._prepared["cpu"] = cpu_backend.prepare_cpu(self.scale, self.zero, self.bias, self.group,
                                                            t16=self.q_layout == "t16")
        elif backend == "cuda" and "cuda" not in self._prepared:
            reason = cuda_backend.mma_reason(self.bits, self.out_features, self.in_features, self.group, self.zero)
            if reason is not None and self.q.is_cuda:
                log_once(f"QuantLinear: CUDA mma layout not used for some layers ({reason}); nibble-row kernels there")
            self._set_layout("mma" if reason is None else "rows")
            self._prepared["cuda"] = cuda_backend.prepare_cuda(self.q, self.scale, self.zero, self.group,
                                                               self.in_features, self.q_layout)
        if x_dtype is not None:
            self._remember(self.q.device.type, x_dtype, backend)
        return backend

    def kernel_state(self, backend: str) -> object:
        """What :meth:`prepare` built for ``backend`` ("cpu": a ``CpuState``, "cuda": a ``CudaWeights``)."""
        if backend not in self._prepared:
            raise KeyError(f"this layer is not prepared for the {backend!r} backend; call prepare({backend!r}) first")
        return self._prepared[backend]

    def _remember(self, device_type: str, dtype: torch.dtype, backend: str) -> None:
        self._backend_for[(device_type, dtype)] = backend
        if backend == "cpu" and dtype in (torch.bfloat16, torch.float32):
            bound = self._prepared["cpu"].plan(self.q, dtype).bound
            if bound is not None:
                self._bound[dtype] = bound
            cpu_backend.SETTINGS_USERS.add(self)

    @torch.compiler.disable
    def _select(self, device: torch.device, dtype: torch.dtype) -> str:
        """Resolve and prepare the backend for (device, dtype) once; later calls are a dict lookup."""
        backend = self.prepare(self.resolve_backend(device, dtype), dtype)  # remembered under the module's device
        if device.type != self.q.device.type:
            self._remember(device.type, dtype, backend)
        return backend

    def native_kernel(self, dtype: torch.dtype) -> object | None:
        """The native CPU kernel (a ``NativeLayer``) this layer's calls with ``dtype`` activations take for few tokens,
        or None (another backend, device or kernel). Prepares the layer for ``dtype`` first."""
        if self.q.device.type != "cpu" or self._select(self.q.device, dtype) != "cpu":
            return None
        return self._bound.get(dtype)

    def __call__(self, x: torch.Tensor, *args: object) -> torch.Tensor:
        """``nn.Module.__call__``, straight to the bound native kernel in eager CPU decode when the module has no hooks,
        is not compiled and keeps its own ``forward``: two Python frames instead of five, which shows on cold caches in
        every layer of a decode step. Anything else (hooks, a replaced forward, tracing, autograd, other devices and
        sizes) takes the normal path. (No ``**kwargs``: forward takes none, and an empty dict per call shows too.)"""
        # plain tensors only: subclasses (fake / functional tensors, DTensor) and FX proxies take the normal path
        bound = self._bound.get(x.dtype) if type(x) is torch.Tensor and _GLOBAL_HOOKS is not None and not args else None
        if (bound is not None and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                                       or self._backward_pre_hooks or self._compiled_call_impl is not None)
                and not any(_GLOBAL_HOOKS) and "forward" not in self.__dict__ and not torch.compiler.is_compiling()):
            entry = bound.outs.get(x.shape)  # shapes whose width and size were checked once
            if entry is None and x.shape[-1] == self.in_features and x.numel() < bound.max_numel:
                entry = bound.entry(x.shape)
            if entry is not None and x.is_cpu and x.is_contiguous() and not x.requires_grad:
                return bound.run(x, entry)
        return super().__call__(x, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim in_features={self.in_features}, got {tuple(x.shape)}")
        backend = self._backend_for.get((x.device.type, x.dtype)) or self._select(x.device, x.dtype)
        if backend == "cuda":
            return cuda_backend.cuda_linear(x, self._prepared["cuda"], self.bias)
        if backend == "cpu":
            state = self._prepared["cpu"]
            if state.t16 and torch.compiler.is_compiling():  # the registered op: traces without a graph break
                return cpu_backend.t16_linear_traced(x, self.q, state)
            return cpu_backend.cpu_linear(x, self.q, state)
        return reference_linear(x, self, self.bias)


_PACK = {"rows": lambda q: q, "t16": t16_pack, "mma": mma_pack}  # from nibble rows
_UNPACK = {"rows": lambda q: q, "t16": t16_unpack, "mma": mma_unpack}  # to nibble rows


def reference_linear(x: torch.Tensor, layer: QuantLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """Oracle: F.linear with the exactly dequantized weight cast to x's dtype."""
    w = layer.dequantize_weight(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
