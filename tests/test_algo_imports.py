"""`slime.algo` stays backend-free: it imports only torch (and the plugin loader), never a backend, the engine or Ray.

    python -m pytest -q tests/test_algo_imports.py
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ALGO_DIR = Path(__file__).resolve().parents[1] / "slime" / "algo"
ALLOWED_ROOTS = {"__future__", "typing", "collections", "math", "dataclasses", "functools", "torch", "slime"}
ALLOWED_SLIME = ("slime.algo", "slime.utils.plugins")
FORBIDDEN = ("slime.backends", "slime.engine", "slime.ray", "ray", "megatron", "sglang", "transformers")


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            names.append(node.module or "")
    return names


def test_algo_sources_import_only_torch_and_slime_algo() -> None:
    files = sorted(ALGO_DIR.glob("*.py"))
    assert len(files) >= 6
    for path in files:
        for name in _imported_modules(path):
            root = name.split(".")[0]
            assert root in ALLOWED_ROOTS, f"{path.name} imports {name}"
            if root == "slime":
                assert name.startswith(ALLOWED_SLIME), f"{path.name} imports {name}"


def test_importing_slime_algo_loads_no_backend_engine_or_ray() -> None:
    code = (
        "import json, sys, slime.algo, slime.algo.rl_loss;"
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})];"
        "print(json.dumps(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ALGO_DIR.parents[1], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
