"""Built-in model assembly: parts, hashes, cache reuse, atomicity, errors; one real SmolLM2 build."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from hf_globalres import models


def _write_parts(root: Path, prefix: str, chunks: list[bytes]) -> None:
    """Fake part packages ``<prefix>1..k`` whose get_part_path() returns their data file."""
    for i, chunk in enumerate(chunks, start=1):
        package = root / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        (package / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(50)), b"\x00" * 1000, b"tail bytes"]
    site = tmp_path / "site"
    _write_parts(site, "fake_gguf_part", chunks)
    monkeypatch.syspath_prepend(str(site))
    spec = models.BuiltinModel(
        name="fake-model",
        gguf_name="fake.gguf",
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
        part_modules=models._parts("fake_gguf_part", 3),
        install="pip install fake-gguf-part1 fake-gguf-part2 fake-gguf-part3",
    )
    return spec, chunks


def test_source_files_in_order(fake_parts):
    spec, chunks = fake_parts
    paths = models.source_files(spec)
    assert [p.read_bytes() for p in paths] == chunks


def test_assemble_checks_hash_and_concatenates(fake_parts, tmp_path):
    spec, chunks = fake_parts
    out = models.assemble_gguf(models.source_files(spec), tmp_path / "cache" / "fake.gguf", spec.sha256)
    assert out.read_bytes() == b"".join(chunks)
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]


def test_assemble_rejects_wrong_hash_and_leaves_nothing(fake_parts, tmp_path):
    spec, _ = fake_parts
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(models.ModelSourceError, match=r"sha256 of fake\.gguf .*damaged.*pip install fake-gguf"):
        models.assemble_gguf(models.source_files(spec)[:2], target, spec.sha256, install_hint=spec.install)
    assert list(target.parent.iterdir()) == []


def test_missing_part_packages_name_the_install_command(monkeypatch):
    spec = models.BuiltinModel(
        name="absent", gguf_name="a.gguf", sha256="0" * 64, install='pip install "x[models]"',
        part_modules=("hf_globalres_no_such_part1", "hf_globalres_no_such_part2"),
    )  # fmt: skip
    with pytest.raises(models.ModelSourceError, match=r"missing: hf_globalres_no_such_part1, .*pip install"):
        models.source_files(spec)
    with pytest.raises(models.ModelSourceError, match="needs the package"):
        models.source_files(
            models.BuiltinModel("absent", "a.gguf", "0" * 64, "pip install y", package_file=("no_such_pkg_x", "a"))
        )


def test_package_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_single_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('this package must not be imported')\n")
    (package / "model.gguf").write_bytes(b"GGUF123")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = models.BuiltinModel(
        "single", "model.gguf", "0" * 64, "pip install s", package_file=("fake_single_gguf", "model.gguf")
    )
    assert models.source_files(spec) == [package / "model.gguf"]
    missing = models.BuiltinModel(
        "single", "m.gguf", "0" * 64, "pip install s", package_file=("fake_single_gguf", "m.gguf")
    )
    with pytest.raises(models.ModelSourceError, match=re.escape("has no file 'm.gguf'; reinstall it: pip install s")):
        models.source_files(missing)


def test_unknown_builtin_name_lists_the_choices(tmp_path):
    with pytest.raises(models.ModelSourceError, match=re.escape("qwen2.5-coder-1.5b-instruct")):
        models.builtin_model_dir("qwen-unknown", cache_dir=tmp_path)


def test_damaged_parts_build_no_cache_entry(fake_parts, tmp_path, monkeypatch):
    spec, _ = fake_parts
    damaged = models.BuiltinModel(spec.name, spec.gguf_name, "f" * 64, spec.install, part_modules=spec.part_modules)
    monkeypatch.setitem(models.BUILTIN, damaged.name, damaged)
    with pytest.raises(models.ModelSourceError, match="damaged"):
        models.builtin_model_dir(damaged.name, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".fake-model.lock"]


def test_interrupted_build_leaves_no_entry(fake_parts, tmp_path, monkeypatch):
    spec, _ = fake_parts
    monkeypatch.setitem(models.BUILTIN, spec.name, spec)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_from_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.builtin_model_dir(spec.name, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".fake-model.lock"]


def test_complete_cache_entry_is_reused_without_sources(tmp_path, monkeypatch):
    spec = models.BuiltinModel("cached", "c.gguf", "a" * 64, "pip install c", part_modules=("no_such_part_c1",))
    monkeypatch.setitem(models.BUILTIN, spec.name, spec)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    entry = tmp_path / "cached"
    entry.mkdir()
    (entry / models._MARKER).write_text(json.dumps({"sha256": "a" * 64}))
    assert models.builtin_model_dir("cached") == entry
    # A marker for other bytes is stale: the entry is rebuilt, which here needs the missing parts.
    (entry / models._MARKER).write_text(json.dumps({"sha256": "b" * 64}))
    with pytest.raises(models.ModelSourceError, match="no_such_part_c1"):
        models.builtin_model_dir("cached")


def test_resolve_specs(tmp_path):
    assert models.resolve("Qwen/Qwen2.5-Coder-1.5B-Instruct") == ("hub", "Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert models.resolve(tmp_path) == ("dir", tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert models.resolve(tmp_path / "m.gguf") == ("gguf", tmp_path / "m.gguf")
    with pytest.raises(models.ModelSourceError, match=r"not a \.gguf file"):
        models.resolve(tmp_path / "weights.bin")
    for missing in (str(tmp_path / "absent"), "./absent-dir", "absent.gguf", "a/b/c"):
        with pytest.raises(models.ModelSourceError, match="not found"):
            models.resolve(missing)


def test_builtin_pair_is_declared_with_full_hashes():
    for name in (models.DEFAULT_TARGET, models.DEFAULT_DRAFT, "smollm2-135m-instruct"):
        spec = models.BUILTIN[name]
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert "pip install" in spec.install
    assert len(models.BUILTIN[models.DEFAULT_TARGET].part_modules) == 22
    assert len(models.BUILTIN[models.DEFAULT_DRAFT].part_modules) == 6


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2 built (or reused) in the default cache, shared with every other real-model test."""
    pytest.importorskip("gguf")
    try:
        models.source_files(models.BUILTIN["smollm2-135m-instruct"])
    except models.ModelSourceError as error:
        pytest.skip(str(error))
    return models.builtin_model_dir("smollm2-135m-instruct")


@pytest.mark.slow
def test_real_smollm2_cache_holds_the_dequantized_gguf(smollm2_dir):
    import gguf

    directory = smollm2_dir
    assert (directory / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert models.builtin_model_dir("smollm2-135m-instruct") == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt

    saved = models.load_model(directory)
    reader = gguf.GGUFReader(models.source_files(models.BUILTIN["smollm2-135m-instruct"])[0])
    tensors = {t.name: t for t in reader.tensors}
    # Quantized (Q4_1 / Q8) and float tensors alike must be the GGUF values, dequantized exactly.
    for gguf_name, param in (
        ("token_embd.weight", saved.model.embed_tokens.weight),
        ("blk.0.ffn_down.weight", saved.model.layers[0].mlp.down_proj.weight),
        ("blk.0.attn_norm.weight", saved.model.layers[0].input_layernorm.weight),
    ):
        t = tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(param.shape)
        assert torch.equal(param.detach(), expected.to(param.dtype)), gguf_name

    tokenizer = models.load_tokenizer(directory)
    assert tokenizer.chat_template is not None and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = saved.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
