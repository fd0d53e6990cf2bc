"""``make gpu-wheels``: download, where the package registries are reachable, the wheels an offline GPU machine
needs next to its own CUDA build of PyTorch: fairseq (``ve-fairseq``) and every other dependency of this package
and its tests, for the machine's Python version, plus this package itself. torch and its CUDA libraries are left
out on purpose: the GPU machine brings its own.

    python scripts/gpu_wheels.py --python-version 3.12 --dest gpu-wheels [--machine-has PACKAGES_FILE]

The list is this environment's installed distributions (``pip freeze``, pinned versions), less torch, its
``nvidia-*``/``triton`` companions and this package. ``--machine-has`` names a file of the packages the GPU
machine already has (one per line, or ``pip list`` / ``pip freeze`` output): those are left out too, which keeps
the wheels small where what travels to the machine is limited (``make gpu-check`` keeps the machine's own
versions of what it has). Packages published only as source are built into wheels here, so that the GPU machine
installs everything with ``--no-index``. ``DEST/requirements.txt`` lists what to install; ``make gpu-check``
reads it.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Set

ROOT = Path(__file__).resolve().parent.parent
#: what the GPU machine has already (its own torch build) or must not get from here
#: (torch's own dependencies come with the machine's torch, in the versions it was built with)
LEFT_OUT = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|fluence-fairseq|fluence_fairseq|pip|setuptools|"
                      r"wheel|sympy|mpmath|networkx|jinja2|markupsafe|fsspec|filelock|typing[-_]extensions)$", re.I)


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case and runs of ``-_.`` do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def package_names(lines: Iterable[str]) -> Set[str]:
    """Canonical names from a list of packages: one per line, ``pip freeze`` (``name==1.0``) or ``pip list``
    (``name 1.0``, its two header lines skipped) output; blank lines and ``#`` comments are ignored."""
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith(("Package ", "---")):
            continue
        names.add(canonical(re.split(r"[\s=<>!~;@\[]", line, maxsplit=1)[0]))
    return names


def requirements(freeze_lines: Iterable[str], machine_has: Set[str] = frozenset()) -> List[str]:
    """Pinned ``name==version`` lines to download, from ``pip freeze`` output, less what the GPU machine has."""
    out = []
    for line in freeze_lines:
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue
        name = line.split("==", 1)[0]
        if not LEFT_OUT.match(name) and canonical(name) not in machine_has:
            out.append(line)
    return sorted(out, key=str.lower)


def missing(requirement_lines: Iterable[str], installed: Set[str]) -> List[str]:
    """The requirement lines whose distribution is not among ``installed`` (canonical names): what the GPU machine
    lacks. What it has stays in the machine's own version (its packages are built to work with its torch)."""
    return [line.strip() for line in requirement_lines
            if line.strip() and not line.startswith("#") and canonical(line.split("==", 1)[0]) not in installed]


def installed_here() -> Set[str]:
    from importlib import metadata

    return {canonical(dist.metadata["Name"]) for dist in metadata.distributions() if dist.metadata["Name"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, e.g. 3.12")
    p.add_argument("--dest", default=str(ROOT / "gpu-wheels"))
    p.add_argument("--machine-has", default=None, metavar="FILE",
                   help="a file of the packages the GPU machine already has: their wheels are not downloaded")
    p.add_argument("--missing", default=None, metavar="REQUIREMENTS",
                   help="on the GPU machine (make gpu-check): print the lines of REQUIREMENTS that this interpreter "
                        "has no distribution of, and download nothing")
    args = p.parse_args(argv)
    if args.missing:
        lines = Path(args.missing).read_text().splitlines()
        print("\n".join(missing(lines, installed_here())))
        return 0
    machine_has = set()
    if args.machine_has:
        try:
            machine_has = package_names(Path(args.machine_has).read_text().splitlines())
        except OSError as error:
            p.error(f"--machine-has {args.machine_has}: cannot read it ({error.strerror}); give a file of package "
                    "names, one per line (or `pip list` output from the GPU machine)")
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    reqs = requirements(freeze, machine_has)
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
    size = sum(w.stat().st_size for w in dest.glob("*.whl")) / 2 ** 20
    print(f"{len(wheels)} wheels ({size:.1f} MiB) in {dest} for Python {args.python_version} "
          f"({len(reqs)} requirements + this package; {len(machine_has)} packages the machine has left out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
