"""Shared fixtures: tiny random character data binarised once per session for the fairseq CLI and DDP tests."""
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: a worker (and the fairseq commands it starts) then uses one thread,
    # since OpenMP threads of several workers competing for the same cores stall each other
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def translation_bin(tmp_path_factory):
    """A binarised joined-dictionary translation data set ``in -> out`` (120 train sentences)."""
    import fairseq_helpers as H

    root = tmp_path_factory.mktemp("translation")
    return H.preprocess_translation(H.create_translation_data(root), root / "data-bin")


@pytest.fixture(scope="session")
def lm_bin(tmp_path_factory):
    """A binarised character language-modelling data set (150 train lines)."""
    import fairseq_helpers as H

    root = tmp_path_factory.mktemp("lm")
    return H.preprocess_lm(H.create_lm_data(root), root / "data-bin")


@pytest.fixture(scope="session")
def stream_checkpoint(lm_bin, tmp_path_factory):
    """(checkpoint path, training log) of the tiny ``fluence_lm_stream`` LM trained for 10 updates."""
    import fairseq_helpers as H

    save = tmp_path_factory.mktemp("stream_ckpt")
    log = H.run_fairseq("train", [lm_bin, *H.stream_args(), *H.tiny_train_flags(save, 10)])
    assert "valid on 'valid' subset" in log
    return save / "checkpoint_last.pt", log


def pytest_generate_tests(metafunc):
    """Attention contract tests (tests/attention_contract.py) run once per pattern the attention supports."""
    case = getattr(metafunc.cls, "case", None) if metafunc.cls is not None else None
    if case is not None and "pattern" in metafunc.fixturenames:
        from attention_contract import supported_patterns
        from fluence_fairseq.modules.attention_base import PATTERNS

        patterns = supported_patterns(case)
        metafunc.parametrize("pattern", patterns, ids=[PATTERNS[p].replace(" ", "-") for p in patterns])


def _devices():
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request):
    """Every device this machine has: tests that take it run on the CPU and, where there is one, on CUDA (with
    CUDA the default device for the test's tensors and modules). ``make gpu-check`` runs them on a GPU."""
    import torch

    dev = torch.device(request.param)
    if dev.type == "cpu":
        yield dev
        return
    torch.set_default_device(dev)
    try:
        yield dev
    finally:
        torch.set_default_device("cpu")
