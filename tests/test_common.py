"""helpers.common: seeds, device choice, content hashes and the verified file cache."""

import numpy as np
import pytest
import torch

from helpers import common


def test_set_seed_makes_all_generators_repeat():
    common.set_seed(3)
    a = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    common.set_seed(3)
    b = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    assert a == b


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_set_seed_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        common.set_seed(bad)


def test_device_defaults_to_cpu_without_gpu(monkeypatch):
    monkeypatch.delenv("BOOK_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert common.device().type == expected


def test_device_override_and_clear_error(monkeypatch):
    monkeypatch.setenv("BOOK_DEVICE", "cpu")
    assert common.device().type == "cpu"
    if not torch.cuda.is_available():
        monkeypatch.setenv("BOOK_DEVICE", "cuda")
        with pytest.raises(ValueError, match="no CUDA device"):
            common.device()


def test_cache_dir_honours_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "c"))
    path = common.cache_dir("models", "x")
    assert path == tmp_path / "c" / "models" / "x" and path.is_dir()


def test_content_hash_is_order_independent_and_sensitive():
    assert common.content_hash({"a": 1, "b": 2}) == common.content_hash({"b": 2, "a": 1})
    assert common.content_hash({"a": 1}) != common.content_hash({"a": 2})


def test_cached_file_builds_once_then_verifies(tmp_path):
    calls = []

    def build(path):
        calls.append(path)
        path.write_bytes(b"weights")

    target = tmp_path / "artefact.bin"
    assert common.cached_file(target, build).read_bytes() == b"weights"
    common.cached_file(target, build)
    assert len(calls) == 1, "a verified artefact must not be rebuilt"
    assert (tmp_path / "artefact.bin.sha256").read_text().strip() == common.file_sha256(target)


def test_cached_file_rebuilds_a_corrupt_artefact(tmp_path):
    calls = []

    def build(path):
        calls.append(path)
        path.write_bytes(b"weights")

    target = tmp_path / "artefact.bin"
    common.cached_file(target, build)
    target.write_bytes(b"weigh")  # truncated by a crash, or edited by hand
    assert common.cached_file(target, build).read_bytes() == b"weights"
    assert len(calls) == 2


def test_committed_copy_is_used_only_when_verified(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def build(path):
        calls.append(path)
        path.write_bytes(b"trained here")

    cached = common.cached_file(common.cache_dir("models", "chX") / "model-abc.pt", build)
    committed = common.commit_cached(cached)
    assert committed == tmp_path / "weights" / "models" / "chX" / "model-abc.pt" and common.verified(committed)
    # a new reader: an empty cache, the committed copy is used and nothing is rebuilt
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "fresh-cache"))
    fresh = common.cache_dir("models", "chX") / "model-abc.pt"
    assert common.cached_file(fresh, build, committed=True) == committed and len(calls) == 1
    # without committed=True the committed copy is not looked at
    assert common.cached_file(fresh, build) == fresh and len(calls) == 2
    # an altered committed copy is ignored, never trusted
    committed.write_bytes(b"tampered")
    assert common.cached_file(fresh, build, committed=True) == fresh and len(calls) == 2
    with pytest.raises(ValueError, match="sidecar"):
        common.commit_cached(committed)


def test_cached_file_complains_when_build_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not write"):
        common.cached_file(tmp_path / "x.bin", lambda path: None)


def test_book_style_applies():
    import matplotlib as mpl

    common.use_book_style()
    assert mpl.rcParams["figure.figsize"] == [7.0, 4.0]


def test_free_cores_is_one_under_parallel_tests_and_can_be_set(monkeypatch):
    monkeypatch.delenv("BOOK_THREADS", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert common.free_cores() == 1
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert common.free_cores() >= 1
    monkeypatch.setenv("BOOK_THREADS", "3")
    assert common.free_cores() == 3
    monkeypatch.setenv("BOOK_THREADS", "two")
    with pytest.raises(ValueError, match="BOOK_THREADS"):
        common.free_cores()


def test_torch_threads_restores_the_previous_number():
    before = torch.get_num_threads()
    with common.torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive int"):
        with common.torch_threads(0):
            pass


def test_report_runtime_glues_time_and_memory(capsys):
    import time

    elapsed, peak = common.report_runtime("chX", time.perf_counter() - 2.0)
    assert elapsed >= 2.0 and peak > 0
    assert "notebook body: 2 s" in capsys.readouterr().out
    with pytest.raises(ValueError, match="glue prefix"):
        common.report_runtime("", 0.0)


def test_glue_figure_closes_the_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    common.glue_figure("test_fig", fig)
    assert not plt.fignum_exists(fig.number)


def test_check_rerun_accepts_last_bit_drift_and_rejects_another_model():
    gen = torch.Generator().manual_seed(0)
    committed = torch.randn(500, 10, generator=gen) * 3
    drift = committed + 1e-3 * torch.randn(500, 10, generator=gen)     # what another CPU's kernels do
    assert "at most 0.00" in common.check_rerun(drift, committed, what="toy")
    with pytest.raises(AssertionError, match="toy"):
        common.check_rerun(committed + 0.5, committed, what="toy")      # a large gap, same predictions
    shuffled = committed[torch.randperm(500, generator=gen)]
    with pytest.raises(AssertionError, match="predictions agree"):
        common.check_rerun(shuffled, committed, what="toy", atol=100.0)  # small enough gap, other predictions
    with pytest.raises(ValueError, match="same shape"):
        common.check_rerun(committed[:10], committed, what="toy")
    with pytest.raises(ValueError, match="NaN"):
        common.check_rerun(committed.clone().fill_(float("nan")), committed, what="toy")


def test_power_of_ten_above_bounds_a_rounding_error_and_refuses_nan():
    assert common.power_of_ten_above(2.8e-7) == common.power_of_ten_above(4.0e-7) == 1e-6   # two CPUs, one bound
    assert common.power_of_ten_above(-3e-3) == 1e-2 and common.power_of_ten_above(1e-5) == 1e-5
    assert common.power_of_ten_above(0.0) == 0.0
    with pytest.raises(ValueError, match="finite"):
        common.power_of_ten_above(float("nan"))
