"""The architecture holds (ARCHITECTURE.md): module and function sizes, no import cycle, no core
module importing a backend, integrations on the public API only, no backend re-implementing
what the core owns.

Run ``python tests/unit/test_architecture.py [PATH...]`` for a report of the largest modules
and functions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ckpt_track"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def function_sizes(path: Path) -> list[tuple[int, str]]:
    sizes = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            sizes.append((node.end_lineno - start + 1, f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}"))
    return sizes


def _imports(name: str, path: Path) -> set[str]:
    """Modules of ckpt_track that ``name`` imports at module level or in functions (not under
    TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    tree = _tree(path)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ckpt_track"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("ckpt_track"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        graph[name] = {m for m in _imports(name, path) if m in mods and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _parent_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges from a module to its own parent packages (``from . import x`` in a package's
    submodule imports the package's __init__, which re-exports its children: not a layering
    cycle)."""
    return {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
            for m, deps in graph.items()}


CORE_EXEMPT = ("ckpt_track.backends", "ckpt_track.testing", "ckpt_track.integrations", "ckpt_track.cli")


def test_no_module_over_the_limit() -> None:
    big = [(len(p.read_text().splitlines()), n) for n, p in _modules().items()]
    over = sorted(x for x in big if x[0] > MAX_MODULE_LINES)
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def test_no_function_over_the_limit() -> None:
    over = sorted(x for p in _modules().values() for x in function_sizes(p) if x[0] > MAX_FUNCTION_LINES)
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_no_import_cycle() -> None:
    cycles = _cycles(_parent_packages(_graph()))
    assert not cycles, f"import cycles inside ckpt_track: {cycles}"


def test_no_core_module_imports_a_backend() -> None:
    bad = []
    for mod, deps in _graph().items():
        if mod.startswith(CORE_EXEMPT) or mod == "ckpt_track":
            continue
        bad += [(mod, d) for d in deps if d.startswith("ckpt_track.backends.") and d != "ckpt_track.backends.registry"]
    assert not bad, f"core modules importing a backend module: {bad}"


def test_integrations_use_only_public_names() -> None:
    import ckpt_track

    public = set(ckpt_track.__all__)
    bad = []
    for name, path in _modules().items():
        if not name.startswith("ckpt_track.integrations"):
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckpt_track"):
                if node.module != "ckpt_track" or node.level:
                    if not node.module.startswith("ckpt_track.integrations"):
                        bad.append(f"{name}: from {node.module} import ...")
                else:
                    bad += [f"{name}: {a.name}" for a in node.names if a.name not in public]
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and name.count(".") >= 3:
                continue  # a sibling inside the integration's own package
            elif isinstance(node, ast.ImportFrom) and node.level:
                bad.append(f"{name}: relative import of {'.' * node.level}{node.module or ''}")
    assert not bad, f"integrations importing non-public ckpt_track names: {bad}"


BACKEND_FORBIDDEN = {
    "unknown option(s)": "option parsing belongs to ckpt_track.options",
    '".tmp-': "use format.TMP_PREFIX / format.staged_dir",
    "resume == \"never\"": "resume policy belongs to ckpt_track.plan.resume_decision",
    "resume == \"must\"": "resume policy belongs to ckpt_track.plan.resume_decision",
    "link_cached(": "the download cache belongs to ckpt_track.cache.fetch",
    "json.dump(": "atomic JSON belongs to format.atomic_json",
}


def test_backends_do_not_reimplement_the_core() -> None:
    bad = []
    for name, path in _modules().items():
        if not name.startswith("ckpt_track.backends.") or name.endswith(("registry", "base")):
            continue
        text = path.read_text()
        bad += [f"{name}: {needle!r} ({why})" for needle, why in BACKEND_FORBIDDEN.items() if needle in text]
    assert not bad, "backends re-implementing what the core owns:\n" + "\n".join(bad)


def report(top: int = 3) -> str:
    mods = sorted(((len(p.read_text().splitlines()), n) for n, p in _modules().items()), reverse=True)
    funcs = sorted((x for p in _modules().values() for x in function_sizes(p)), reverse=True)
    lines = ["largest modules:", *(f"  {n:5d} {m}" for n, m in mods[:top]),
             "largest functions:", *(f"  {n:5d} {f}" for n, f in funcs[:top])]
    return "\n".join(lines)


if __name__ == "__main__":
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    print(report(top))
    over_m = [(n, m) for n, m in sorted(((len(p.read_text().splitlines()), n) for n, p in _modules().items()),
                                         reverse=True) if n > MAX_MODULE_LINES]
    print("modules over limit:", over_m)
    fo = sorted((x for p in _modules().values() for x in function_sizes(p) if x[0] > MAX_FUNCTION_LINES),
                reverse=True)
    print(f"functions over limit ({len(fo)}):")
    for n, f in fo:
        print(f"  {n:4d} {f}")
    print("cycles:", _cycles(_parent_packages(_graph())))
