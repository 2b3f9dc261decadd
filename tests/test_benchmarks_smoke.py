"""Smoke test of the speed benchmark harness at tiny sizes (< 20 s).

Checks the JSON it writes and that our PCGrad and the textbook PCGrad give the same
shared update on the same inputs at K = 2 (where PCGrad's task order does not matter).
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from benchmarks import speed
from benchmarks.baselines import pcgrad_vectors
from benchmarks.workloads import WorkloadConfig, build_model, make_data

TINY = WorkloadConfig(in_dim=16, width=32, depth=3, batch=8)


def test_harness_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--width", "32", "--in-dim", "16", "--batch", "8", "--ks", "2", "--reps", "2"]
    argv += ["--warmup", "1", "--impls", "floor,ours-pcgrad,textbook-pcgrad", "--agg-calls", "20"]
    argv += ["--threads", str(torch.get_num_threads())]
    argv += [
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "speed.png"),
        "--markdown",
        str(tmp_path / "speed.md"),
    ]
    speed.main(argv)

    doc = json.loads(out.read_text())
    assert {"machine", "config", "conflict", "results", "skipped", "aggregation_us"} <= set(doc)
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["machine"]["threads"] >= 1
    assert doc["conflict"]["2"]["pairs"] == 1
    for name in ("floor", "ours-pcgrad", "textbook-pcgrad"):
        cell = doc["results"][name]["2"]
        assert cell["reps"] == 2 and len(cell["times_ms"]) == 2
        assert cell["median_ms"] > 0 and cell["ratio_to_floor"] > 0
    assert doc["results"]["floor"]["2"]["ratio_to_floor"] == pytest.approx(1.0)
    assert doc["gradient_modes"]["ours-pcgrad"]["2"] in ("frontier", "batched", "looped", "lean")
    for label in ("pcgrad", "gradvac"):
        assert doc["aggregation_us"][label]["2"] > 0
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "| ours-pcgrad |" in (tmp_path / "speed.md").read_text()


def _one_step_grads(name: str, k: int) -> list:
    model = build_model(TINY, k)
    step = speed.IMPLS[name].setup(model, lambda params: torch.optim.SGD(params, lr=0.0))
    step(make_data(TINY, k)[0])
    return [p.grad.detach().clone() for p in model.shared_parameters()]


def test_ours_matches_textbook_pcgrad_k2():
    ours = _one_step_grads("ours-pcgrad", 2)
    textbook = _one_step_grads("textbook-pcgrad", 2)
    plain = _one_step_grads("floor", 2)
    for a, b in zip(ours, textbook):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the workload conflicts, so the surgery really changed the update
    assert any(not torch.allclose(a, c, rtol=1e-3, atol=1e-6) for a, c in zip(ours, plain))


def test_workload_conflicts_and_is_reproducible():
    m1, m2 = build_model(TINY, 4), build_model(TINY, 4)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    (x1, y1), (x2, y2) = make_data(TINY, 4)[0], make_data(TINY, 4)[0]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_textbook_pcgrad_two_opposite_vectors():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    out = pcgrad_vectors(g, orders=[[1], [0]])
    # each projected row is orthogonal to the other original row
    g0 = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
    g1 = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
    torch.testing.assert_close(out, g0 + g1)
    assert out @ g[0] >= 0 and out @ g[1] >= 0


def test_torchjd_pcgrad_matches_textbook_k2():
    pytest.importorskip("torchjd")
    grads = _one_step_grads("torchjd-pcgrad", 2)
    textbook = _one_step_grads("textbook-pcgrad", 2)
    # K = 2: the same shared update (PCGrad on the trunk's Jacobian, summed)
    for a, b in zip(grads, textbook):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_pytorch_optimizer_pcgrad_runs_k2():
    pytest.importorskip("pytorch_optimizer")
    # Not compared: it flattens *all* parameters, so heads enter the norms it projects
    # with (a different shared update by design); only check that it drives the model.
    grads = _one_step_grads("pytorch_optimizer-pcgrad", 2)
    assert all(torch.isfinite(g).all() for g in grads)


def test_tiny_workload_is_torchjds_example_and_reports_ratios(tmp_path):
    pytest.importorskip("torchjd")
    from benchmarks.workloads import TINY

    model = build_model(TINY, 2)
    assert [m.weight.shape for m in model.trunk if isinstance(m, torch.nn.Linear)] == [(5, 10), (3, 5)]
    assert [h.weight.shape for h in model.heads] == [(1, 3), (1, 3)] and TINY.batch == 16
    doc = speed.main(["--tiny", "--quick", "--reps", "5", "--warmup", "1", "--out", str(tmp_path)])
    for label in ("ours-pcgrad / torchjd-pcgrad", "ours-sum / floor"):
        ratio = doc["ratios"][label]
        assert ratio["median"] > 0 and ratio["best"] > 0 and ratio["paired"] > 0
    assert doc["results"]["ours-pcgrad"]["reps"] == 5
    assert json.loads((tmp_path / "speed_tiny.json").read_text())["config"]["workload"]["hidden"] == [5, 3]


@pytest.mark.slow  # fresh processes per memory cell: the heaviest smoke run of the benchmarks
def test_scaling_quick_times_both_trunks_and_measures_memory(tmp_path):
    argv = ["--scaling", "--quick", "--out", str(tmp_path), "--cnn-ks", "2", "--mlp-ks", "2"]
    argv += ["--impls", "floor,ours-pcgrad,ours-pcgrad-looped,ours-pcgrad-representation"]
    argv += ["--memory-impls", "ours-pcgrad", "--warmup", "1", "--threads", "1"]
    doc = speed.main(argv)
    assert set(doc["trunks"]) == {"cnn", "mlp"}
    for section in doc["trunks"].values():
        for name in ("floor", "ours-pcgrad", "ours-pcgrad-looped", "ours-pcgrad-representation"):
            cell = section["results"][name]["2"]
            assert cell["median_ms"] > 0 and cell["min_ms"] <= cell["median_ms"]
        assert section["memory_mb"]["ours-pcgrad"]["2"].get("delta_mb", -1) >= 0
        assert section["modes"]["ours-pcgrad-looped"]["2"].startswith("looped")
    assert (tmp_path / "speed_scaling.png").stat().st_size > 0
    assert "| ours-pcgrad |" in (tmp_path / "speed_scaling.md").read_text()


def test_speed_writes_no_absolute_path(tmp_path):
    argv = ["--width", "32", "--in-dim", "16", "--batch", "8", "--ks", "2", "--reps", "1", "--agg-calls", "5"]
    argv += ["--impls", "floor,ours-pcgrad", "--no-plot", "--out", str(tmp_path), "--threads", "1"]
    speed.main(argv)
    text = (tmp_path / "speed.json").read_text()
    assert str(tmp_path) not in text and '"/' not in text


def test_gpu_table_command_runs_on_cpu_and_records_the_device(tmp_path):
    """``--gpu-table``'s code path at tiny sizes on the CPU: timings, ratios, device fields."""
    names = ["floor", "ours-pcgrad", "ours-pcgrad-representation"]
    names += ["torchjd-pcgrad"] if importlib.util.find_spec("torchjd") else []
    argv = ["--gpu-table", "--device", "cpu", "--quick", "--trunks", "mlp", "--ks", "2", "--reps", "1"]
    argv += [
        "--warmup",
        "1",
        "--agg-calls",
        "5",
        "--no-memory",
        "--impls",
        ",".join(names),
        "--out",
        str(tmp_path),
    ]
    speed.main(argv)
    doc = json.loads((tmp_path / "speed_cpu.json").read_text())
    machine = doc["machine"]
    assert machine["device"] == "cpu" and machine["device_name"]
    assert machine["torch"] == torch.__version__ and machine["cuda"] == torch.version.cuda
    assert "cudnn" in machine and machine["timer"] == "wall"
    section = doc["trunks"]["mlp"]
    assert section["config"]["device"] == "cpu" and section["ks"] == [2]
    for name in names:
        assert section["results"][name]["2"]["median_ms"] > 0
    assert section["modes"]["ours-pcgrad-representation"]["2"].startswith("representation (")
    text = (tmp_path / "speed_cpu.md").read_text()
    assert "/ plain step" in text and "/ TorchJD PCGrad" in text and "| ours-pcgrad | 2 |" in text


def test_gpu_table_shows_the_peak_allocated_memory_and_both_ratios():
    from benchmarks.speed_gpu import gpu_table_text

    cells = {"floor": 10.0, "torchjd-pcgrad": 40.0, "ours-pcgrad": 20.0}
    section = {
        "title": "mlp, batch 256",
        "rounds": {"4": 5},
        "ks": [4],
        "results": {n: {"4": {"median_ms": ms, "min_ms": ms}} for n, ms in cells.items()},
        "memory_mb": {"ours-pcgrad": {"4": {"peak_mb": 123.4, "delta_mb": 23.4}}},
    }
    machine = {"device": "cuda:0", "device_name": "GPU", "torch": "2.x", "cuda": "12.x", "cudnn": 9}
    doc = {"machine": {**machine, "threads": 1, "timer": "wall"}, "inner": "Adam", "memory_measure": "m"}
    text = gpu_table_text({**doc, "trunks": {"mlp": section}}, list(cells))
    assert "peak torch.cuda.max_memory_allocated (MB)" in text
    assert "| ours-pcgrad | 4 | 20.00 | 20.00 | 2.00x | 0.50x | 123.4 |" in text
    assert "cuda:0 (GPU), torch 2.x, CUDA 12.x, cuDNN 9" in text


def test_device_options_refuse_what_cannot_run():
    from benchmarks.common import parse_device
    from benchmarks.speed_timing import step_timer

    with pytest.raises(ValueError, match="cannot time cuda kernels"):
        step_timer(torch.device("cuda"), "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="CUDA is not available"):
            parse_device("cuda")
    assert step_timer(torch.device("cpu"), "cpu")(lambda: None) >= 0


def test_heads_with_several_outputs_regress_their_own_targets():
    cfg = WorkloadConfig(in_dim=16, width=32, depth=2, batch=8, head_outputs=3)
    model = build_model(cfg, 4)
    x, y = make_data(cfg, 4)[0]
    assert [h.weight.shape for h in model.heads] == [(3, 32)] * 4 and y.shape == (8, 4, 3)
    losses = model.losses((x, y))
    assert len(losses) == 4 and all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses)
    assert make_data(TINY, 4)[0][1].shape == (8, 4)  # one output per head: (N, K) as before


def test_quality_trains_on_the_device_given():
    from benchmarks import quality

    cfg = quality.config_from(quality.build_parser().parse_args(["--device", "cpu"]))
    assert cfg.device == "cpu" and cfg.to_dict()["device"] == "cpu"
