"""The repo's layout, read from the source (no imports run): model.py is the model, modules
use one another's public names only, and the imports form no cycle."""

import ast
import io
import re
import tokenize

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
    share is public (model.hidden, decode.next_logits, fineweb.init_worker, ...)."""
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


# -- sizes a newcomer can read -------------------------------------------------------------------

MAX_FUNCTION_LINES, MAX_FILE_LINES, MAX_LINE_CHARS = 80, 600, 120


def test_no_function_over_80_lines():
    long = []
    for name in MODULES:
        for node in ast.walk(tree(name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_no_file_over_600_lines_nor_line_over_120_characters():
    problems = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES:
            problems.append(f"{name}.py: {len(lines)} lines")
        problems += [f"{name}.py:{i}: {len(ln)} characters" for i, ln in enumerate(lines, 1) if len(ln) > MAX_LINE_CHARS]
    assert not problems, "\n".join(problems)


# A measured figure: a number with a unit of time or speed ("~3 us", "0.1 s", "1,491 tok/s"), a ratio
# ("2.76x") or a share ("70%"). A value in quotes ("5%" as a flag takes it) is a setting, not a measurement.
FIGURE = re.compile(r"(?<![\w.\"'])~?\d[\d,]*(\.\d+)?\s?(ns|us|µs|ms|s|sec|seconds|min|minutes|h|tok/s|tokens/s|it/s"
                    r"|GB/s|MB/s)(?![\w/])|(?<![\w.\"'])~?\d+(\.\d+)?x(?!\w)|(?<![\w.\"'])~?\d+(\.\d+)?%")


def comments_and_docstrings(path):
    """(line, text) of every comment and docstring line of a module."""
    src = path.read_text()
    found = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found += [(node.body[0].lineno + i, line) for i, line in enumerate(doc.splitlines())]
    return found


def test_no_measured_figure_in_a_docstring_or_comment():
    """Measurements and their history live in BENCHMARKS.md and the commit log, where they carry a
    date, a machine and a command; docstrings and comments say what and why."""
    found = [f"{name}.py:{line}: {m.group(0)!r} in {text.strip()[:100]!r}"
             for name, path in MODULES.items() for line, text in comments_and_docstrings(path)
             for m in FIGURE.finditer(text)]
    assert not found, "\n".join(found)


def test_the_figure_pattern_finds_figures():
    """The pattern above, on what it must find and what it must let be."""
    for text in ("takes ~3 us", "0.83x -> 0.87x", "1,491 tok/s", "70% of that", "about 0.1 s", "40 ms on Linux"):
        assert FIGURE.search(text), text
    for text in ('warm-up ("5%" of the run)', "a 64x1025 batch", "step_000040", "the 2 ranks", "python3.11"):
        assert not FIGURE.search(text), text


def test_every_module_opens_with_its_job():
    missing = [name for name in MODULES if not ast.get_docstring(tree(name))]
    assert not missing, missing
