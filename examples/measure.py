"""What the example experiments share: running a command while measuring its wall time and peak memory."""
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd, log_path):
    """Run ``cmd`` (from the repository root) with its output in ``log_path``; return (wall seconds, peak RSS in MB
    of that process). Exits with the log's tail if the command fails."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed (see {log_path}):\n{Path(log_path).read_text()[-3000:]}")
    return time.time() - start, usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux
