"""The import rules of the design (Qt-free core, torch-free core, one-way layers) are
checked here so that a wrong import fails CI instead of surviving review."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.lower() or " 0 broken" in proc.stdout


def _modules_after(statement: str) -> set:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_light_cli_does_not_import_torch_or_qt():
    mods = _modules_after("import annotator.cli")
    heavy = {m for m in mods if m.split(".")[0] in {"torch", "anomalib", "timm", "PySide6", "lightning"}}
    assert not heavy, sorted(heavy)[:10]
