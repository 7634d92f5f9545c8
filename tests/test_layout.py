"""The layering and sizes docs/ARCHITECTURE.md describes, checked: the GAN core without Ray, config as the
ground floor, no module over 400 lines and no function over 80."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aigc_ray"


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_the_gan_core_imports_without_ray_and_config_imports_nothing_of_ours():
    core = _imported_after("import aigc_ray.gan.step, aigc_ray.gan.models, aigc_ray.gan.losses, aigc_ray.gan.augment")
    assert "torch" in core and not any(m == "ray" or m.startswith("ray.") for m in core)
    config = _imported_after("import aigc_ray.config")
    assert {m for m in config if m.startswith("aigc_ray")} == {"aigc_ray", "aigc_ray.config", "aigc_ray.config.checks",
                                                              "aigc_ray.config.sections"}


def test_no_module_over_400_lines_and_no_function_over_80():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(PACKAGE.parent))
        if text.count("\n") > 400:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{name}: {node.name}() {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
