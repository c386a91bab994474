"""`python -m gpt.kernels`: build (or load) the C++ kernels and print the code path they run.

`make install` runs this so the first model load does not pay the compile.
"""

from __future__ import annotations

import sys

from gpt import kernels


def main() -> int:
    if kernels.available():
        print(f"gpt.kernels: {kernels.cpu_path()} (supported: {', '.join(kernels.supported_paths())})")
    else:
        print(f"gpt.kernels: unavailable ({kernels.unavailable_reason()}); the layers use their fallback")
    return 0  # never fail an install over an optional speed-up


if __name__ == "__main__":
    sys.exit(main())
