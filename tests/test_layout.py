"""The repo's layout, read from the source (no imports run): model.py is the model, modules
use one another's public names only, and the imports form no cycle."""

import ast

import pytest
from conftest import REPO_ROOT

MODULES = {p.stem: p for p in sorted(REPO_ROOT.glob("*.py"))}


def tree(name):
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def private(name):
    return name.startswith("_") and not name.startswith("__")


def defined_names(t):
    """Every name a module defines: top level, in its classes (methods, class attributes) and as
    attributes it assigns (self._x = ...)."""
    names = set()
    for node in ast.walk(t):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def imported_modules(t):
    """The repo modules a module imports, anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(t):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & MODULES.keys()


def test_no_module_uses_another_modules_private_names():
    """A private name (_x) of one module is never imported or reached from another: what scripts
    share is public (model.hidden, model.next_logits, fineweb.init_worker, ...)."""
    defined = {name: defined_names(tree(name)) for name in MODULES}
    problems = []
    for name in MODULES:
        t = tree(name)
        others = {n for m, names in defined.items() if m != name for n in names if private(n)}
        for node in ast.walk(t):
            if isinstance(node, ast.ImportFrom) and node.module in MODULES:
                problems += [f"{name}.py imports {node.module}.{a.name}" for a in node.names if private(a.name)]
            elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr in others \
                    and node.attr not in defined[name]:
                problems.append(f"{name}.py:{node.lineno} uses .{node.attr}, private to "
                                f"{', '.join(m for m in MODULES if m != name and node.attr in defined[m])}")
    assert not problems, "\n".join(problems)


def test_model_py_is_the_model():
    """model.py needs nothing of the repo and nothing beyond torch and the standard library: loading,
    saving, the Hub and the tokenizer live in model_io.py."""
    t = tree("model")
    assert not imported_modules(t), imported_modules(t)
    third_party = {n for n in _top_level_imports(t)} - {"torch", "math", "dataclasses", "time", "threading"}
    assert not third_party, third_party
    names = defined_names(t)
    for gone in ("load_model", "save_pretrained", "get_tokenizer", "best_device", "urllib", "peak_flops"):
        assert gone not in names, f"model.py still defines {gone}"


def _top_level_imports(t):
    for node in ast.walk(t):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def test_imports_form_no_cycle():
    graph = {name: imported_modules(tree(name)) - {name} for name in MODULES}
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        if state.get(n) == "open":
            pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
        state[n] = "open"
        for m in sorted(graph[n]):
            visit(m, path + [n])
        state[n] = "done"

    for n in sorted(graph):
        visit(n, [])
