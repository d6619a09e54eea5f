"""Which dtype and kernels run fastest on a device, decided from what the hardware reports.

``dtype="auto"`` (the default of the eval CLI, the benchmarks and the
examples) resolves to bfloat16 where the device multiplies bf16 matrices
natively and to float32 elsewhere:

- CUDA: bfloat16 when ``torch.cuda.is_bf16_supported()`` (Ampere and later);
- CPU: bfloat16 when the processor has AVX-512 BF16 or AMX-BF16 instructions
  (``torch.cpu.get_capabilities()``, or ``/proc/cpuinfo`` on torch versions
  without it). Without them bf16 matrix products are emulated: on an AVX2
  CPU a 1536 × 8960 layer over 9 rows costs 5× one row, and a forward of the
  1.5B built-in target over 17 tokens 11× a one-token one, so float32 is
  faster there.

A model loaded in bf16 samples from its bf16 law; the verifiers work on
float64 probabilities computed from its logits, so they stay exact for the
model as it runs, whatever its dtype.

On CPUs, :func:`use_onednn_linear` routes a float32 model's linear layers
through oneDNN instead of the default BLAS call. On processors where that
BLAS handles a few rows poorly (seen on AMD EPYC with AVX2: a 1536 × 8960
layer over 9 rows in 11.5 ms against 5.0 ms with oneDNN; the LM head over 9
rows in 206 against 70 ms), this makes the 1.5B target's verification
forward over 5–33 tokens 1.5–1.7× cheaper and a one-token step 1.3× cheaper
(measured in ``eval/bench_generate.py``'s forward costs). With ``pack_rows``
it also moves each weight into oneDNN's blocked layout for products over about
that many rows, once, instead of on every call (:class:`PackedLinear`): on that
EPYC the 1.5B target's forward over 5 / 17 tokens then costs 349 / 590 ms
against 495 / 732 ms unpacked (``PACK_ROWS`` = 32, a 200-token cache; a
one-token step moves within noise). Either way the logits change by float rounding only
(≤ 3e-4 on the built-in pair's layers). The model then *is* that model: plain
sampling and speculative decoding from it have one and the same law, so
compare methods with the same setting.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

import torch

#: Rows the blocked weights of :func:`use_onednn_linear` are laid out for: verification forwards over
#: trees of 4 branches (5–49 tokens) run faster with it, a one-token step within noise (module docstring).
PACK_ROWS = 32

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Values a ``dtype`` option takes: "auto" or a name in :data:`DTYPES`.
DTYPE_CHOICES = ("auto", *DTYPES)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """The CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX-BF16)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where ``device`` computes it natively (module docstring), else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for ``name`` ("auto", "float32", "bfloat16", "float16" or a dtype) on ``device``.

    Raises:
        ValueError: an unknown name; the message lists the choices.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name]


def onednn_linear_available() -> bool:
    """This torch build can run linear layers through oneDNN on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_runs(x: torch.Tensor) -> bool:
    """oneDNN's linear serves ``x``: float32 inference on the CPU."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not _onednn_runs(x):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn_linear(model: torch.nn.Module, pack_rows: int | None = None) -> int:
    """Run every ``nn.Linear`` of ``model`` through oneDNN for float32 CPU inference (module docstring).

    Layers fall back to ``torch.nn.functional.linear`` for other devices,
    dtypes and under autograd. With ``pack_rows``, each layer whose weight no
    other module shares becomes a :class:`PackedLinear` laid out for that many
    rows (inference on the CPU only; its memory replaces the weight's); shared
    (tied) weights stay in place. Returns the number of layers switched (0 when
    this torch build has no oneDNN); :func:`restore_linear` undoes it.
    """
    if not onednn_linear_available():
        return 0
    if pack_rows is not None and pack_rows < 1:
        raise ValueError(f"pack_rows must be a positive number of rows, got {pack_rows}")
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            if pack_rows is not None and owners[id(child.weight)] == 1 and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child.weight, child.bias, pack_rows))
            else:
                child.forward = types.MethodType(_onednn_forward, child)
            count += 1
    if any(isinstance(module, PackedLinear) for module in model.modules()):
        _leave_file_mappings(model)
    return count


def _leave_file_mappings(model: torch.nn.Module) -> None:
    """Copy the parameters and buffers of ``model`` into memory of their own, in place.

    Loaders map checkpoint files into memory (safetensors) with every tensor a view of one mapping:
    while one tensor still views it, the pages of the weights that were packed stay resident too
    (measured: the 0.5B draft at 4.3 GB resident after packing instead of 2.9 GB).
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


class PackedLinear(torch.nn.Module):
    """``y = x Wᵀ + b`` with ``W`` held once, in oneDNN's blocked layout for about ``rows`` rows.

    Made by :func:`use_onednn_linear` from a float32 ``nn.Linear`` on the CPU,
    for inference: under autograd, for another device or dtype it raises
    (:func:`restore_linear` gives the ``nn.Linear`` back). ``state_dict`` and
    ``copy.deepcopy`` see the plain weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.nn.Parameter | None, rows: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rows = rows
        self.weight_requires_grad = weight.requires_grad
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out, in] weight: a copy out of the blocked layout, as costly as the layer's weight is
        large (``out_features`` and ``in_features`` give its shape)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _onednn_runs(x):
            raise RuntimeError(
                f"this linear layer's weight is packed for float32 CPU inference, got a {x.dtype} input on "
                f"{x.device}{' with autograd on' if torch.is_grad_enabled() else ''}: run it under "
                "torch.no_grad(), or call hf_globalres.devices.restore_linear(model) first"
            )
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        weight = state_dict.pop(prefix + "weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if weight is not None:
            state_dict[prefix + "weight"] = weight
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float(), self.rows)

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        bias = None if self.bias is None else torch.nn.Parameter(self.bias.detach().clone(), self.bias.requires_grad)
        return PackedLinear(self.weight.requires_grad_(self.weight_requires_grad), bias, self.rows)

    def to_linear(self) -> torch.nn.Linear:
        """The ``nn.Linear`` this layer computes."""
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(self.weight, requires_grad=self.weight_requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}"


class Int8Linear(torch.nn.Module):
    """``y = x Wᵀ + b`` with ``W ≈ s ⊙ W8``: int8 weights ``W8`` [out, in] and one scale ``s`` per output row.

    ``s_o = max_i |W_oi| / 127``, ``W8 = round(W / s)``; activations are rounded to
    bfloat16 for the product, and the output returns in the input's dtype.
    """

    def __init__(self, linear: torch.nn.Linear | PackedLinear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:
            out = torch.nn.functional.linear(flat, self.weight_int8.to(flat.dtype) * self.scale[:, None])
        out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def quantize_int8(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` (or :class:`PackedLinear`) of ``model``, the LM head included, by an
    :class:`Int8Linear`, in place.

    Meant for the draft model (module docstring); returns the number of layers replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear | PackedLinear):
                setattr(parent, name, Int8Linear(child))
                replaced += 1
    return replaced


def restore_linear(model: torch.nn.Module) -> None:
    """Undo :func:`use_onednn_linear`: plain ``nn.Linear`` layers with their weights in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, child.to_linear())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "forward" in module.__dict__:
            del module.forward


__all__ = [
    "DTYPES",
    "DTYPE_CHOICES",
    "PACK_ROWS",
    "Int8Linear",
    "PackedLinear",
    "auto_dtype",
    "cpu_has_fast_bf16",
    "onednn_linear_available",
    "quantize_int8",
    "resolve_dtype",
    "restore_linear",
    "use_onednn_linear",
]
