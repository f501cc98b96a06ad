"""python -m cupyep.bench: the report it prints and plots (the measuring needs GPUs)."""
import os

import pytest

from cupyep import bench

ROWS = [dict(kind="normal", tokens=t, fp8_dispatch=100.0 + t / 100, bf16_dispatch=200.0, combine=300.0,
             nccl=float("nan")) for t in (512, 4096)] + \
       [dict(kind="low_latency", tokens=t, dispatch_us=20.0 + t / 10, combine_us=30.0, nccl_us=50.0)
        for t in (16, 128)]


def test_table_has_a_row_per_size():
    text = bench.table(ROWS).splitlines()
    assert text[0].startswith("normal kernels") and any(line.strip().startswith("low-latency") for line in text)
    assert [line.split("|")[0].strip() for line in text if "|" in line and line.split("|")[0].strip().isdigit()] \
        == ["512", "4096", "16", "128"]
    assert "141.0" in bench.table(ROWS) and "32.8" in bench.table(ROWS)


def test_plot_writes_a_png_when_matplotlib_is_there(tmp_path):
    path = str(tmp_path / "bench.png")
    made = bench.plot(ROWS, path, "test")
    assert made == os.path.exists(path)
    if made:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_experts_split_over_any_rank_count():
    assert [bench.experts_for_ranks(256, r) for r in (1, 2, 3, 4, 6, 8)] == [256, 256, 255, 256, 252, 256]
    assert bench.experts_for_ranks(4, 8) == 8


def test_bench_without_a_gpu_says_what_it_needs(monkeypatch):
    import cupyep
    from cupyep import bench
    if cupyep.gpu_available():
        pytest.skip("a GPU is usable here")
    with pytest.raises(SystemExit, match="needs a CUDA GPU, CuPy and nvshmem4py"):
        bench.main([])
