"""dtype resolution, oneDNN linears and the int8 draft (hf_globalres/devices.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers

import hf_globalres
from hf_globalres import devices

from .generation.conftest import tiny_llama
from .generation.test_generate import batch


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_follows_the_cpu(monkeypatch, fast):
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: fast)
    assert devices.resolve_dtype("auto", "cpu") == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize("supported", [True, False])
def test_auto_dtype_on_cuda(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    assert devices.auto_dtype("cuda") == (torch.bfloat16 if supported else torch.float32)


def test_named_dtypes_and_errors():
    assert devices.resolve_dtype("float32") == torch.float32
    assert devices.resolve_dtype("bfloat16") == torch.bfloat16
    assert devices.resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of auto"):
        devices.resolve_dtype("fp8")


def test_cpu_capability_is_a_boolean():
    devices.cpu_has_fast_bf16.cache_clear()
    assert devices.cpu_has_fast_bf16() in (True, False)


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_onednn_linears_change_logits_by_rounding_only():
    model = tiny_llama(11)
    ids = torch.randint(0, 16, (3, 7))
    with torch.no_grad():
        expected = model(ids).logits
        assert devices.use_onednn_linear(model) == 2 * 7 + 1  # 7 linears per layer, the LM head
        fast = model(ids).logits
    devices.restore_linear(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.allclose(fast, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_onednn_linears_keep_autograd():
    model = tiny_llama(12, layers=1)
    devices.use_onednn_linear(model)
    model(torch.randint(0, 16, (1, 4))).logits.sum().backward()
    assert model.lm_head.weight.grad is not None
    devices.restore_linear(model)


def test_int8_linear_matches_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = devices.Int8Linear(linear)
    x = torch.randn(5, 3, 64)
    expected = linear(x)
    got = quantized(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight_int8.abs().max() <= 127


def test_quantize_int8_replaces_every_linear():
    model = tiny_llama(13)
    assert devices.quantize_int8(model) == 2 * 7 + 1
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_greedy_with_int8_draft_and_onednn_target_equals_plain_generate():
    """The draft's numerics change acceptance only; a oneDNN target is the model both methods sample."""
    draft = tiny_llama(1, layers=1)
    devices.quantize_int8(draft)
    fast_target = tiny_llama(0)
    devices.use_onednn_linear(fast_target)
    inputs = batch()
    expected = fast_target.generate(**inputs, do_sample=False, max_new_tokens=20)
    out = hf_globalres.generate(
        fast_target, **inputs, assistant_model=draft, num_drafts=3, do_sample=False, max_new_tokens=20
    )
    assert torch.equal(out, expected)


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_packed_linears_change_logits_by_rounding_only_and_restore_exactly():
    model = tiny_llama(13)
    ids = torch.randint(0, 16, (3, 7))
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(ids).logits
        assert devices.use_onednn_linear(model, pack_rows=8) == 2 * 7 + 1
        packed = [m for m in model.modules() if isinstance(m, devices.PackedLinear)]
        assert len(packed) == 2 * 7 + 1 and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        fast = model(ids).logits
        one_row = model(ids[:1, :1]).logits
    assert torch.allclose(fast, expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(one_row, expected[:1, :1], atol=1e-4, rtol=1e-4)
    # The plain weights are still what state_dict and deepcopy see.
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, fast)
    devices.restore_linear(model)
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 2 * 7 + 1


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_packed_linears_load_a_state_dict_and_refuse_autograd():
    model, source = tiny_llama(14), tiny_llama(15)
    devices.use_onednn_linear(model, pack_rows=4)
    model.load_state_dict(source.state_dict())
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="restore_linear"):
        model(ids)
    with pytest.raises(ValueError, match="pack_rows must be a positive"):
        devices.use_onednn_linear(tiny_llama(16), pack_rows=0)


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_packing_leaves_tied_weights_in_place():
    model = tiny_llama(17)
    model.lm_head.weight = model.model.embed_tokens.weight
    devices.use_onednn_linear(model, pack_rows=4)
    assert isinstance(model.lm_head, torch.nn.Linear) and "forward" in model.lm_head.__dict__
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(isinstance(m, devices.PackedLinear) for m in model.modules()) == 2 * 7


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_a_packed_model_quantizes_to_the_same_int8_layers():
    plain, packed = tiny_llama(18), tiny_llama(18)
    devices.use_onednn_linear(packed, pack_rows=4)
    devices.quantize_int8(plain), devices.quantize_int8(packed)
    for name, value in plain.state_dict().items():
        assert torch.equal(packed.state_dict()[name], value), name


def _file_mappings(directory) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files in ``directory`` (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(str(directory)):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_packing_leaves_no_tensor_viewing_a_loaded_file(tmp_path):
    """A loader's memory map holds every weight's pages while one tensor views it; packing copies the rest out."""
    tiny_llama(19).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)

    def viewing_the_file() -> int:
        ranges = _file_mappings(tmp_path)
        pointers = [t.data_ptr() for t in [*model.parameters(), *model.buffers()]]
        return sum(any(start <= pointer < end for start, end in ranges) for pointer in pointers)

    mapped = viewing_the_file()
    devices.use_onednn_linear(model, pack_rows=4)
    assert viewing_the_file() == 0, f"{mapped} tensors viewed the checkpoint before packing"


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_generate_never_copies_a_packed_weight_out(monkeypatch):
    """A packed weight's plain copy costs as much as the layer is large (0.9 s for a 152k-token head)."""
    from hf_globalres.generation.loop import output_width

    model = tiny_llama(20)
    devices.use_onednn_linear(model, pack_rows=4)

    def refuse(self):
        raise AssertionError("a packed weight was copied out of its layout")

    monkeypatch.setattr(devices.PackedLinear, "weight", property(refuse))
    assert output_width(model) == model.config.vocab_size
    ids = torch.randint(0, 16, (2, 5))
    out = hf_globalres.generate(model, ids, assistant_model=model, num_drafts=2, do_sample=True, max_new_tokens=4)
    assert out.shape == (2, 9)
