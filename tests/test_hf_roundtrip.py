"""Hugging Face models: a local save_pretrained directory as the model source (transformers' own key
names), prune, save_pretrained with a config describing the pruned widths, from_pretrained gives the
same outputs; compress.load never touches the network (sockets blocked, HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import compress

from conftest import REPO, tiny_recipe

transformers = pytest.importorskip("transformers")

UNIFORM = {"ratio": 0.5, "scope": "uniform", "heads": {"ratio": 0.5, "head_dims": False},
           "guards": {"round_to": None, "min_channels": None}}


def _vit(tmp_path, channels=3, image=16, labels=10):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=image, patch_size=4, num_channels=channels, hidden_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 num_labels=labels)
    src = tmp_path / "vit-src"
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(src)
    return src


def _close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_vit_prune_save_pretrained_from_pretrained(tmp_path, one_thread):
    src = _vit(tmp_path)
    keys = json.loads((src / "config.json").read_text())
    assert keys["architectures"] == ["ViTForImageClassification"]
    model = compress.load(src)  # transformers' key names, local files only
    x = torch.randn(2, 3, 16, 16)
    reference = transformers.ViTForImageClassification.from_pretrained(src).eval()
    assert _close(model(x).logits, reference(x).logits)

    res = compress.prune(model, x[:1], **UNIFORM)
    assert res.params_after < res.params_before
    saved = compress.save_pretrained(model, tmp_path / "vit-pruned")
    assert saved.from_pretrained, saved.reason
    assert saved.config_changes == {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit-pruned").eval()
    assert _close(back(x).logits, model(x).logits)
    assert _close(compress.load(tmp_path / "vit-pruned")(x).logits, model(x).logits)


def test_segformer_prune_save_pretrained_from_pretrained(tmp_path, one_thread):
    from compress.zoo import MODELS

    model = MODELS.get("hf_segformer")(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    compress.prune(model, x[:1], **UNIFORM)
    saved = compress.save_pretrained(model, tmp_path / "seg")
    assert saved.from_pretrained, saved.reason
    assert saved.config_changes["hidden_sizes"] == [16, 32]
    back = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "seg").eval()
    assert _close(back(x).logits, model(x).logits)
    assert _close(compress.load(tmp_path / "seg")(x).logits, model(x).logits)


def test_widths_a_config_cannot_express_are_stated_and_load_with_compress(tmp_path, one_thread):
    model = compress.load(_vit(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    compress.prune(model, x[:1], ratio=0.5, scope="global")  # q/k/v width no longer hidden_size
    saved = compress.save_pretrained(model, tmp_path / "vit-global")
    assert not saved.from_pretrained and "cannot describe" in saved.reason
    cfg = json.loads((tmp_path / "vit-global" / "config.json").read_text())
    assert cfg["compress_pruned_widths"] == {k: list(v) for k, v in saved.widths.items()}
    assert _close(compress.load(tmp_path / "vit-global")(x).logits, model(x).logits)


OFFLINE = textwrap.dedent("""
    import socket, sys
    def refuse(*a, **k):
        raise OSError("network blocked by the test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    import torch, compress
    out = []
    for path in sys.argv[1:]:
        m = compress.load(path)
        out.append(type(m).__name__)
    print(" ".join(out))
""")


def test_load_never_touches_the_network(tmp_path, one_thread):
    """A recipe with ``model: {hf: DIR}`` runs; its run directory, the source directory and a
    save_pretrained directory all load with sockets blocked and the Hub switched off."""
    src = _vit(tmp_path, channels=1, image=8)
    recipe = tiny_recipe(model={"hf": str(src), "task": "image-classification"},
                         stages=[{"kind": "sparsify", "pattern": "2:4"}])
    res = compress.run(compress.recipe.validate_data(recipe), out=tmp_path / "run")
    assert res.status == "passed"
    arch = json.loads(next((tmp_path / "run" / "stages").glob("*/arch.json")).read_text())
    assert arch["factory"] == "compress.zoo:hf_pretrained" and "config" in arch["kwargs"]  # not the directory
    assert "path" not in arch["kwargs"]
    compress.save_pretrained(res.model(), tmp_path / "pretrained")
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(src), str(tmp_path / "pretrained")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ViTForImageClassification"] * 3
