"""The PyTorch CUDA bench backends: a clean refusal without a GPU, graph replay equal to eager with one."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.bench import BACKENDS, BackendOptions, BenchModel, resolve
from vitcompact.latency.backends import make_backend, random_batch
from vitcompact.cli.app import app

CUDA_BACKENDS = ("torch-cuda", "torch-cuda-fp16")
without_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
with_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_backends_are_registered():
    assert set(CUDA_BACKENDS) <= set(BACKENDS.names())


def test_bench_help_lists_cuda_backends():
    r = CliRunner().invoke(app, ["bench", "--help"])
    assert r.exit_code == 0
    assert all(name in " ".join(r.stdout.split()) for name in CUDA_BACKENDS)


@without_gpu
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_refused_without_a_gpu(name):
    with pytest.raises(vc.BackendUnavailableError) as info:
        make_backend(name, BackendOptions(threads=1))
    message = str(info.value)
    assert message.startswith(f"backend {name}: no CUDA GPU is available to this torch {torch.__version__}")
    assert len(message.splitlines()) == 1


@without_gpu
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_cli_refusal_is_one_line_and_exit_2(name):
    r = CliRunner().invoke(app, ["bench", "vit-digits", "vit-digits", "--backend", name])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"error: backend {name}: no CUDA GPU is available to this torch {torch.__version__}; "
        "use --backend torch (CPU) here, or run on a machine with an NVIDIA GPU"]
    assert "Traceback" not in r.output


@with_gpu
@pytest.mark.parametrize("name, dtype, tolerance", [("torch-cuda", torch.float32, 1e-4),
                                                    ("torch-cuda-fp16", torch.float16, 2e-2)])
def test_graph_replay_matches_eager(name, dtype, tolerance):
    torch.manual_seed(0)
    dense = resolve(vc.create_model("vit-digits"))
    backend = make_backend(name, BackendOptions(threads=1, seed=3))
    run = backend.load(dense)(4)
    replayed = run().float().cpu()
    assert backend.settings()["cuda_graphs"] is True, backend.settings()["eager_fallbacks"]
    torch.testing.assert_close(run().float().cpu(), replayed)  # a replay gives the same result again
    x = torch.from_numpy(random_batch(4, dense.input_size, seed=3)).to("cuda", dtype)
    with torch.inference_mode():
        eager = dense.module.to("cuda", dtype)(x).float().cpu()
    torch.testing.assert_close(replayed, eager, atol=tolerance, rtol=tolerance)
    with pytest.raises(vc.ConfigError, match="not an ONNX file"):
        backend.load(BenchModel("m.onnx", dense.input_size, None, onnx_path="m.onnx"))
