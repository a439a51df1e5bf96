import sys
from pathlib import Path

# Make the shared reference implementations importable as `metrics_reference` under any pytest import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
