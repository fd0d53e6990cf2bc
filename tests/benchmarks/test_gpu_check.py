"""The GPU readiness commands, checked where CI can: the device benchmark runs (on the CPU here) and reports every
attention against both baselines; the wheel list leaves torch to the GPU machine; the check script refuses a
machine without CUDA with a clear message."""
import subprocess

import fairseq_helpers as H
from benchmarks import gpu_check
from fluence_fairseq.modules.registry import ATTENTIONS


def test_device_benchmark_reports_every_attention_against_both_baselines(tmp_path):
    out = tmp_path / "report.md"
    gpu_check.main(["--device", "cpu", "--lengths", "32", "--dim", "32", "--heads", "4", "--repeats", "1",
                    "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 32 |")]
    modules = [row[1] for row in rows]
    assert modules == ["fairseq_mha", "sdpa", *ATTENTIONS], modules
    for row in rows:
        float(row[3])  # a train time, not an error
    decoders = {row[1] for row in rows if row[7].strip(" |") not in ("-", "")}
    assert {"fairseq_mha", "softmax", "performer", "s4d"} <= decoders


def test_device_benchmark_profiles_the_slow_steps(tmp_path):
    """The attentions at least ``--profile-above`` times slower than fairseq's get one profiled step: how many
    calls (kernels on CUDA) and which ops take the time. 0 profiles every attention, a negative value none."""
    out = tmp_path / "report.md"
    args = ["--device", "cpu", "--lengths", "32", "--dim", "32", "--heads", "4", "--repeats", "1", "--out", str(out)]
    gpu_check.main(args + ["--profile-above", "0"])
    text = out.read_text()
    assert "## Where the slow training steps go (one step profiled at length 32)" in text
    rows = [line.split(" | ") for line in text.split("## Where")[1].splitlines() if line.startswith("| ")][1:]
    assert [row[0].strip("| ") for row in rows] == list(ATTENTIONS)
    for row in rows:
        assert int(row[1]) > 0 and float(row[2]) > 0 and "`aten::" in row[3], row
    gpu_check.main(args + ["--profile-above", "-1"])
    assert "## Where" not in out.read_text()


def test_slow_modules_are_those_over_the_ratio_at_the_longest_length():
    rows = [{"module": "fairseq_mha", "length": 8, "train_ms": 1.0}, {"module": "a", "length": 8, "train_ms": 9.0},
            {"module": "fairseq_mha", "length": 16, "train_ms": 2.0}, {"module": "a", "length": 16, "train_ms": 3.0},
            {"module": "b", "length": 16, "train_ms": 4.0}, {"module": "c", "length": 16, "error": "out of memory"},
            {"module": "sdpa", "length": 16, "train_ms": 9.0}]
    assert gpu_check.slow_modules(rows, 2.0) == ["b"]
    assert gpu_check.slow_modules(rows, 0.0) == ["a", "b"]


def _gpu_wheels():
    return H.load_script("scripts/gpu_wheels.py", "gpu_wheels")


def test_wheel_list_leaves_torch_and_its_companions_to_the_gpu_machine():
    freeze = ["torch==2.13.0", "nvidia-cublas-cu12==12.4", "triton==3.1", "ve-fairseq==0.12.3", "numpy==2.4.6",
              "sympy==1.14.0", "-e git+https://example.invalid/x#egg=x", "fluence_fairseq==0.2.0", "pytest==9.2.0"]
    assert _gpu_wheels().requirements(freeze) == ["numpy==2.4.6", "pytest==9.2.0", "ve-fairseq==0.12.3"]


def test_gpu_check_refuses_a_machine_without_cuda():
    proc = subprocess.run(["bash", str(H.REPO / "scripts" / "gpu_check.sh")], cwd=H.REPO, capture_output=True,
                          text=True, env=H.clean_env(GPU_PYTHON=str(__import__("sys").executable)))
    assert proc.returncode != 0 and "no CUDA device visible to torch" in proc.stderr


def test_wheels_leave_out_what_the_gpu_machine_has():
    """``--machine-has`` (a file of names, or pip list / pip freeze output) keeps the wheels to what the machine
    lacks; names compare as pip compares them (case, ``-``, ``_`` and ``.`` alike)."""
    gw = _gpu_wheels()
    has = gw.package_names(["# the image", "Package    Version", "---------- -------", "NumPy 2.5.2", "PyYAML==6.0",
                            "ruamel.yaml", "", "hydra_core  # a comment"])
    assert has == {"numpy", "pyyaml", "ruamel-yaml", "hydra-core"}
    freeze = ["numpy==2.4.6", "hydra-core==1.3.8", "omegaconf==2.3.1", "ve-fairseq==0.12.3", "torch==2.13.0"]
    assert gw.requirements(freeze, has) == ["omegaconf==2.3.1", "ve-fairseq==0.12.3"]


def test_gpu_check_installs_only_what_the_machine_lacks():
    """On the GPU machine the machine's own versions stay (they are built for its torch): only the requirement
    lines without an installed distribution are installed."""
    gw = _gpu_wheels()
    lines = ["numpy==1.0", "Hydra_Core==1.3.8", "ve-fairseq==0.12.3", ""]
    assert gw.missing(lines, {"numpy", "hydra-core"}) == ["ve-fairseq==0.12.3"]
    assert "pytest" in gw.installed_here() and "torch" in gw.installed_here()


def test_the_h200_package_list_names_torch_and_not_fairseq():
    listing = (H.REPO / "scripts" / "gpu_machines" / "nvidia-h200.txt").read_text().splitlines()
    names = _gpu_wheels().package_names(listing)
    assert {"torch", "numpy", "pytest-xdist", "sacrebleu"} <= names
    assert not names & {"ve-fairseq", "fairseq", "omegaconf"}
