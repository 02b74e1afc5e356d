"""The compute set-up: which precision 'auto' picks, which optimiser kernels run, and that bf16 autocast
training converges with fp32 master weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ListLoader
from imgrec.config import RunConfig
from imgrec.engine import system
from imgrec.engine.trainer import OPTIMIZERS, evaluate, fit, optimizer_kernels
from imgrec.errors import UsageError
from imgrec.models.registry import build_model

CPU = torch.device("cpu")


def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system, "cpu_has_native_bf16", lambda: True)
    assert system.autocast_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(system, "cpu_has_native_bf16", lambda: False)
    assert system.autocast_dtype("auto", CPU) is None  # emulated bf16 is slower than fp32: stay in fp32
    assert system.autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for explicitly, it is used anyway
    assert system.autocast_dtype("fp32", CPU) is None


def test_auto_precision_on_a_gpu_without_bf16_is_fp16_except_for_muon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda = torch.device("cuda")
    assert system.autocast_dtype("auto", cuda) is torch.float16
    assert system.autocast_dtype("auto", cuda, "sgd") is torch.float16
    assert system.autocast_dtype("auto", cuda, "muon") is None  # fp16's loss scaling misses Muon's filter views
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert system.autocast_dtype("auto", cuda, "muon") is torch.bfloat16


def test_native_bf16_probe_answers_without_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(system.cpu_has_native_bf16(), bool)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe
    assert system.cpu_has_native_bf16() is False


def test_fp16_on_the_cpu_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--precision fp16 needs a CUDA GPU"):
        system.autocast_dtype("fp16", CPU)


def test_precision_names_match_the_flag() -> None:
    assert [system.precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimisers_use_fused_kernels_on_the_cpu(name: str) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = OPTIMIZERS[name](model.parameters(), RunConfig(optimizer=name), optimizer_kernels(CPU))
    assert optimizer.param_groups[0]["fused"] is True
    assert optimizer_kernels(torch.device("meta")) == {"foreach": True}


def test_fused_and_foreach_kernels_take_the_same_steps() -> None:
    """The fused kernels are a speed-up, not another optimiser: a few Adam steps agree to float tolerance."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    weights = []
    for kernels in ({"fused": True}, {"foreach": True}):
        torch.manual_seed(1)
        model = build_model("lenet", 3, 1, (8, 8))
        optimizer = OPTIMIZERS["adam"](model.parameters(), RunConfig(lr=1e-2), kernels)
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_training_converges_with_fp32_master_weights(tmp_path: Path) -> None:
    """Two Gaussian blobs per class, separable: a bf16 LeNet learns them as well as fp32 does, and its
    weights stay fp32 (autocast only computes in bf16)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 1, 12, 12, generator=generator)
    y = torch.arange(256) % 4
    x = centres[y] + 0.8 * torch.randn(256, 1, 12, 12, generator=generator)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    accuracy = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model("lenet", 4, 1, (12, 12))
        cfg = RunConfig(model="lenet", epochs=4, lr=2e-3, device="cpu", threads=1, precision=precision)
        meta = {"kind": "imgrec-weights", "model": {"name": "lenet"}, "classes": [], "mean": [0.0], "std": [1.0],
                "channels": 1, "image_size": [12, 12]}
        (tmp_path / precision).mkdir()
        fit(model, ListLoader(batches * 3), None, cfg, tmp_path / precision, meta)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        accuracy[precision] = evaluate(model, ListLoader(batches), CPU).accuracy  # scored in fp32
    assert accuracy["bf16"] >= 0.95 and accuracy["fp32"] >= 0.95


def test_the_compute_line_counts_threads_in_words() -> None:
    one = system.Compute(CPU, torch.bfloat16, torch.channels_last, 1)
    assert one.describe() == "cpu, bf16 autocast, channels_last, 1 thread"
    assert system.Compute(CPU, None, torch.contiguous_format, 2).describe() == "cpu, fp32, contiguous, 2 threads"
