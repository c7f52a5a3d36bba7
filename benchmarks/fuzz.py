"""A long fuzzing run: the property-based tests of tests/test_fuzz.py with many random cases.

CI runs those tests with a fixed set of 1,700 cases; this runs ``--examples``
per test, drawn at random (hypothesis prints the seed of any failure, and a
blob to reproduce it).

    python benchmarks/fuzz.py --examples 20000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="cases per test")
    args = parser.parse_args()
    os.environ["FMT_AUDIT_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["FMT_AUDIT_FUZZ_RANDOM"] = "1"
    sys.exit(pytest.main(["-q", str(ROOT / "tests" / "test_fuzz.py"), "-p", "no:cacheprovider"]))
