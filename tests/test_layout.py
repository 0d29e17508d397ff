"""The package's layout as docs/design.md describes it: imports run down the layers and never in a
circle, the training loop stays a page, and long functions are the ones the design names."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "transformer"

# Low to high; a module may import from its own layer and the ones below. training and decoding
# share a layer and must not import each other.
LAYERS = [
    {"transformer.atomic", "transformer.config", "transformer.runtime", "transformer.precision", "transformer.bleu"},
    {"transformer.model"},
    {"transformer.data"},
    {"transformer.checkpoint"},
    {"transformer.training", "transformer.decoding"},
    {"transformer.train"},
    {"transformer.commands", "transformer.serve"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer entry a module belongs to: its sub-package, or itself at the top level."""
    for layer in LAYERS:
        for name in layer:
            if module == name or module.startswith(name + "."):
                return name
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit(module) in layer)


def package_imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (at any depth of its code)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    imported.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {m for m in imported if m in modules}
    return graph


def test_every_import_goes_down_the_layers_or_stays_in_its_own():
    wrong = [f"{module} imports {target}" for module, targets in package_imports().items() for target in targets
             if layer_of(target) > layer_of(module)
             or (layer_of(target) == layer_of(module) and unit(target) != unit(module)
                 and {unit(target), unit(module)} == {"transformer.training", "transformer.decoding"})]
    assert wrong == []


def test_no_module_imports_itself_through_others():
    graph = package_imports()
    # A package's __init__ importing its own modules is not a cycle through others.
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def function_lengths() -> dict[str, int]:
    """Lines of every function in the package, its docstring excluded, by dotted name."""
    lengths = {}
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack = [(node, module) for node in tree.body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, ast.ClassDef):
                stack += [(child, f"{prefix}.{node.name}") for child in node.body]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str)
                start = node.body[1].lineno if has_docstring and len(node.body) > 1 else first.lineno
                lengths[f"{prefix}.{node.name}"] = node.end_lineno - start + 1
                stack += [(child, f"{prefix}.{node.name}") for child in node.body]
    return lengths


def test_long_functions_are_the_ones_docs_design_lists_with_their_length():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = design[design.index("### Functions over 80 lines"):]
    listed = {name: int(n) for name, n in re.findall(r"^\| `([\w.]+)` \| (\d+) \|", section, flags=re.M)}
    long = {name: n for name, n in function_lengths().items() if n > 80}
    assert long == listed


def test_the_training_loop_module_stays_a_few_pages():
    assert len((PACKAGE / "train.py").read_text(encoding="utf-8").splitlines()) <= 350
    assert function_lengths()["transformer.train.train_loop"] <= 30
