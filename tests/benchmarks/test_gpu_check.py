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
