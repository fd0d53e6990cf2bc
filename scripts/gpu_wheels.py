"""``make gpu-wheels``: download, where the package registries are reachable, the wheels an offline GPU machine
needs next to its own CUDA build of PyTorch: fairseq (``ve-fairseq``) and every other dependency of this package
and its tests, for the machine's Python version, plus this package itself. torch and its CUDA libraries are left
out on purpose: the GPU machine brings its own.

    python scripts/gpu_wheels.py --python-version 3.12 --dest gpu-wheels

The list is this environment's installed distributions (``pip freeze``, pinned versions), less torch, its
``nvidia-*``/``triton`` companions and this package. Packages published only as source are built into wheels
here, so that the GPU machine installs everything with ``--no-index``. ``DEST/requirements.txt`` lists what to
install; ``make gpu-check`` reads it.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what the GPU machine has already (its own torch build) or must not get from here
#: (torch's own dependencies come with the machine's torch, in the versions it was built with)
LEFT_OUT = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|fluence-fairseq|fluence_fairseq|pip|setuptools|"
                      r"wheel|sympy|mpmath|networkx|jinja2|markupsafe|fsspec|filelock|typing[-_]extensions)$", re.I)


def requirements(freeze_lines):
    """Pinned ``name==version`` lines to download, from ``pip freeze`` output."""
    out = []
    for line in freeze_lines:
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue
        name = line.split("==", 1)[0]
        if not LEFT_OUT.match(name):
            out.append(line)
    return sorted(out, key=str.lower)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, e.g. 3.12")
    p.add_argument("--dest", default=str(ROOT / "gpu-wheels"))
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    reqs = requirements(freeze)
    (dest / "requirements.txt").write_text("\n".join(reqs) + "\n")
    abi = "cp" + args.python_version.replace(".", "")
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
                 "linux_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest),
           "--python-version", args.python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
           "--abi", "none", *[a for plat in platforms for a in ("--platform", plat)], "-r", str(dest / "requirements.txt")]
    subprocess.run(cmd, check=True)
    for sdist in [*dest.glob("*.tar.gz"), *dest.glob("*.zip")]:  # source-only packages: build wheels here
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dest), str(sdist)],
                       check=True)
        sdist.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dest), str(ROOT)], check=True)
    wheels = sorted(w.name for w in dest.glob("*.whl"))
    print(f"{len(wheels)} wheels in {dest} for Python {args.python_version} ({len(reqs)} requirements + this package)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
