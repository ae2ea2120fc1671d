"""lm-evaluation-harness tasks shipped with FASC (offline). `TASK_DIR` is the folder to give lm-eval's
`--include_path` / `TaskManager(include_path=...)`; `fasc.harness` runs them on a loaded model."""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
