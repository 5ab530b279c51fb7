"""Process memory for the benchmarks; standard library only, so that both the project's
venv and the separate MONAI venv can import it."""

import os
import resource
import subprocess


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (VmHWM). Not ``ru_maxrss``: on
    Linux that keeps the parent's high-water mark across fork/exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def other_load() -> dict:
    """Load average and whether model training ran beside the benchmark."""
    r = subprocess.run(["pgrep", "-f", "resmtnet-train"], capture_output=True, text=True)
    pids = [p for p in r.stdout.split() if p.strip() and int(p) != os.getpid()]
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "training_processes": len(pids)}
