"""The layout docs/architecture.md describes, checked: stratlm/core holds interfaces only. It
imports no outer layer, reads no environment variable and looks up no family, strategy, loader
or transform by name; it stays a small share of the code. The models import no backend (a
backend plugs its own path into them). And `ruff check` is clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from stratlm.core.registry import get_registry

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "stratlm" / "core"
#: the layers above core: core must not import them (imports point toward the core)
OUTER = ("models", "strategies", "transforms", "loaders", "backends", "decoding", "training", "cli", "plugins", "engine", "server", "distributed")


def core_modules() -> list[tuple[str, ast.Module]]:
    return [(path.name, ast.parse(path.read_text(), str(path))) for path in sorted(CORE.glob("*.py"))]


def imported_modules(tree: ast.Module, package: str = "stratlm.core") -> list[str]:
    """Every module an import statement in `package` names (function-level imports included), absolute."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from stratlm.core, `.x` is stratlm.core.x and `..x` is stratlm.x
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                names += [module] if node.module else [f"{base}.{alias.name}" for alias in node.names]
            else:
                names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_core_imports_no_outer_layer():
    forbidden = tuple(f"stratlm.{layer}" for layer in OUTER)
    offending = [(name, module) for name, tree in core_modules() for module in imported_modules(tree)
                 if module == "stratlm" or module.startswith(tuple(f"{f}." for f in forbidden)) or module in forbidden]
    assert offending == [], f"stratlm/core imports outer layers: {offending}"


def test_models_import_no_backend():
    """models/ is plain MLX; a backend's own path plugs in from the backend (on CUDA
    backends/cuda/decoder.install sets DecoderLM.fast_forward), never imported by the models."""
    models = ROOT / "stratlm" / "models"
    offending = [(path.name, module) for path in sorted(models.rglob("*.py"))
                 for module in imported_modules(ast.parse(path.read_text(), str(path)), "stratlm.models")
                 if module == "stratlm.backends" or module.startswith("stratlm.backends.")]
    assert offending == [], f"stratlm/models imports backends: {offending}"


def test_core_reads_no_environment_variable():
    offending = []
    for name, tree in core_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                offending.append((name, node.lineno, node.attr))
            elif isinstance(node, ast.ImportFrom) and node.module == "os" and {a.name for a in node.names} & {"environ", "getenv"}:
                offending.append((name, node.lineno, "from os import"))
    assert offending == [], f"stratlm/core reads environment variables (do it in engine, device or env.py): {offending}"


def test_core_looks_up_nothing_by_a_builtin_name():
    """No registered family, strategy, loader, transform or alias name is a string in core, and
    no registry lookup in core passes a literal name."""
    registry = get_registry()
    builtin = {n: kind for kind in ("model family", "strategy", "loader", "transform", "model alias") for n in registry.names(kind)}
    assert {"llama", "greedy", "gguf", "collapse"} <= set(builtin)  # the check has something to find
    offending = []
    for name, tree in core_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in builtin:
                offending.append((name, node.lineno, node.value, builtin[node.value]))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(node.args) == 2
                    and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)):
                offending.append((name, node.lineno, "registry lookup by a literal name", ast.unparse(node)))
    assert offending == [], f"stratlm/core names built-ins: {offending}"


def test_core_is_a_small_share_of_the_code(capsys):
    def lines(paths) -> int:
        return sum(len(p.read_text().splitlines()) for p in paths)

    core, total = lines(CORE.glob("*.py")), lines((ROOT / "stratlm").rglob("*.py"))
    with capsys.disabled():
        print(f"\nstratlm/core: {core} of {total} Python lines ({core / total:.0%})")
    assert core / total < 0.2  # 44% before issue 12's layout; interfaces only now


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.importorskip("ruff")
        from ruff.__main__ import find_ruff_bin

        ruff = find_ruff_bin()
    done = subprocess.run([ruff, "check", "--no-cache", "stratlm", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
