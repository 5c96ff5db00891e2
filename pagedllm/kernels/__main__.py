"""`python -m pagedllm.kernels`: build the native CPU kernels now rather than on first use."""

import logging
import sys

from pagedllm.kernels import load_cpu_ops

logging.basicConfig(level=logging.INFO, format="%(message)s")
ok = load_cpu_ops()
print("native CPU kernels: " + ("ready" if ok else "unavailable (the torch attention path will be used)"))
sys.exit(0)
