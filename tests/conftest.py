import sys
from pathlib import Path

# Tests import ddpm_helpers from the repository root, wherever pytest is started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
