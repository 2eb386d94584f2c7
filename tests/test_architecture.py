"""The package's structure: no import cycles, no imports hidden in functions, layers that do not reach
up, and no family or objective compared by name outside the modules that define them."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plamo_jax"
REPO = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(tree: ast.AST, top_level_only: bool) -> set[str]:
    """plamo_jax modules an AST imports (at module level, or anywhere)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES}


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(ast.parse(path.read_text()), top_level_only=True) - {name}
            for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return trail[trail.index(child):] + [child]
            if child not in state and (cycle := visit(child, trail + [child])):
                return cycle
        state[node] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


SOURCES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "tools").glob("*.py"), *(REPO / "launch").glob("*.py")])


def hidden_imports(tree: ast.AST) -> list[str]:
    return [f"{node.name}() imports {sorted(hidden)}" for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and (hidden := imported_modules(node, top_level_only=False))]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_project_import_hides_inside_a_function(path):
    assert not hidden_imports(ast.parse(path.read_text())), path


def test_the_hidden_import_check_catches_what_it_is_for():
    assert hidden_imports(ast.parse("def f():\n    from plamo_jax.train import trainer\n"))
    assert not hidden_imports(ast.parse("def f():\n    import seqio\n"))  # optional third-party extras


def reaches(source_prefix: str, target_prefix: str) -> list[str]:
    return sorted(f"{name} -> {target}" for name, targets in import_graph().items()
                  if name.startswith(source_prefix) for target in targets if target.startswith(target_prefix))


@pytest.mark.parametrize("source, forbidden", [
    ("plamo_jax.data", "plamo_jax.posttrain"),  # chat / preference readers are formats passed in
    ("plamo_jax.data", "plamo_jax.train"),
    ("plamo_jax.models", "plamo_jax.configuration"),
    ("plamo_jax.models", "plamo_jax.train"),
    ("plamo_jax.models", "plamo_jax.data"),
    ("plamo_jax.parallel", "plamo_jax.models"),
    ("plamo_jax.convert.llama", "plamo_jax.train"),  # the HF format tables
    ("plamo_jax.convert.qwen3", "plamo_jax.train"),
    ("plamo_jax.convert.mixtral", "plamo_jax.train"),
    ("plamo_jax.convert.plamo2", "plamo_jax.train"),
    ("plamo_jax.convert.config_json", "plamo_jax.train"),
])
def test_lower_layers_do_not_import_higher_ones(source, forbidden):
    assert not reaches(source, forbidden)


def _names(node: ast.AST) -> list[str]:
    """Identifier names an expression refers to (`cfg.family` -> ["cfg", "family"])."""
    return [n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(node)
            if isinstance(n, ast.Attribute | ast.Name)]


def _is_name_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, ast.Tuple | ast.List | ast.Set) and all(_is_name_literal(e) for e in node.elts)


def name_comparisons(tree: ast.AST) -> list[str]:
    """`x.family == "moe"`, `objective != 'dpo'`, `family in ("a", "b")` ... anywhere in a tree."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = [side for side in sides if {"family", "objective"} & {n.lower() for n in _names(side)}
                 and not _is_name_literal(side)]
        if named and any(_is_name_literal(side) for side in sides):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


OUTSIDE_MODELS = [path for path in sorted(PACKAGE.rglob("*.py"))
                  if "models" not in path.relative_to(PACKAGE).parts]
ENTRY_POINTS = sorted([*(REPO / "tools").glob("*.py"), *(REPO / "launch").glob("*.py")])


@pytest.mark.parametrize("path", OUTSIDE_MODELS + ENTRY_POINTS,
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_family_or_objective_is_compared_by_name_outside_models(path):
    assert not name_comparisons(ast.parse(path.read_text())), path


def test_the_name_check_catches_what_it_is_for():
    samples = ['cfg.family == "moe"', 'if config.train.objective != "dpo": pass', 'family in ("a", "b")',
               'model_cfg.family not in ["dense"]']
    assert all(name_comparisons(ast.parse(sample)) for sample in samples)
    assert not name_comparisons(ast.parse('spec.name == other.name'))
    assert not name_comparisons(ast.parse('x == "moe"'))
