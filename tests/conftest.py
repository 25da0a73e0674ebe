import os
import re

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The variable
# must be set before triton (and normscope's Triton backend) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CUDA suite runs on GPU machines (benchmarks/gpu_suite.sh); without a device it is not
    # collected at all rather than reported as skipped.
    collect_ignore = ["cuda"]


_SYSTEM_PACKAGE = re.compile(r"apt-get install (\w[\w.-]*)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """One closing line naming the tests skipped for a missing system package, and the command that installs it."""
    result = yield  # after pytest's own summary, so that this is the last line before the counts
    missing: dict = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        m = _SYSTEM_PACKAGE.search(reason)
        if m:
            missing.setdefault(m.group(1), []).append(report.nodeid.split("::")[0])
    if not missing:
        return result
    total = sum(len(v) for v in missing.values())
    parts = "; ".join(f"{pkg}: " + ", ".join(f"{f} x{files.count(f)}" for f in sorted(set(files)))
                      for pkg, files in sorted(missing.items()))
    terminalreporter.write_line(
        f"normscope: {total} tests skipped for missing system packages ({parts}); "
        "install them with: sudo bash scripts/install-system-deps.sh"
    )
    return result
