"""The package layout's rules, checked on the source (ast only): which part may import which, and no import cycles.

Parts: the vocabulary (`errors`, `config`, `options`, `stats`), `runtime/`, `cache/`, `storage/`, `quant/`,
`kernels/`, `models/`, `plugins/`, `tools/`, and the faces (`cli`, `demo/`, `webui/`, `serve/`, plus the
`langchain_integration` and `webui_extension` packages). Arrows run one way: faces -> runtime and plugins -> cache,
storage, quant -> kernels, models (kernels read only the byte forms of quant/).
Every import counts, including those inside functions and `if TYPE_CHECKING:` blocks. Faces and tools talk to a
loaded model through its public API and session only: no private runtime attribute is read outside `runtime/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "mixtral_offload_plugin"
PACKAGES = (PKG, "langchain_integration", "webui_extension")
VOCAB = {"errors", "config", "stats", "options"}
FACES = {"cli", "demo", "webui", "serve"}
UI_LIBS = {"gradio", "langchain_core", "langchain_integration", "langchain", "langchain_tests"}

# part -> parts of this package it must not import, and third-party modules it must not import
FORBIDDEN: dict[str, tuple[set[str], set[str]]] = {
    "vocab": ({"runtime", "cache", "storage", "quant", "models", "plugins", "tools"} | FACES, set()),
    "cache": ({"runtime", "storage", "quant", "models", "plugins", "tools"} | FACES,
              {"transformers", "safetensors", "hqq", "torch.nn"} | UI_LIBS),
    "storage": ({"runtime", "cache", "quant", "models", "plugins", "tools"} | FACES,
                {"transformers", "hqq", "torch.nn"} | UI_LIBS),
    "quant": ({"runtime", "cache", "models", "plugins", "tools"} | FACES, UI_LIBS),
    "kernels": ({"runtime", "cache", "models", "plugins", "tools"} | FACES, UI_LIBS),
    "models": ({"runtime", "cache", "storage", "quant", "plugins", "tools"} | FACES, UI_LIBS),
    "plugins": ({"tools"} | FACES, UI_LIBS),
    "runtime": ({"tools"} | FACES, UI_LIBS),
    "tools": (FACES, UI_LIBS),
    "face": ({"cache", "storage", "quant", "kernels"}, set()),
}
# narrower allowances inside a part
ONLY_FROM: dict[str, dict[str, set[str]]] = {
    "quant": {"storage": {f"{PKG}.storage.packing"}},  # quant lays its bytes out with storage's packing only
    # kernels read the byte forms the quantizers write (and nothing else of quant/) in storage's packed buffers
    "kernels": {"storage": {f"{PKG}.storage.packing"}, "quant": {f"{PKG}.quant.formats", f"{PKG}.quant.bitpacking"}},
}
HOOK_CORE = {f"{PKG}.plugins.hookspecs", f"{PKG}.plugins.manager"}  # import only the vocabulary


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Absolute names of every module imported by `name` (anywhere in the file)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return found


def part_of(name: str) -> str | None:
    if not name.startswith(PKG):
        return "face" if name.split(".")[0] in PACKAGES else None
    rest = name.split(".")[1:]
    if not rest:
        return "api"  # the package root: the public API, may import anything
    head = rest[0]
    if head in VOCAB:
        return "vocab"
    if head in FACES:
        return "face"
    return head


def _known(mods: dict[str, Path], name: str) -> str | None:
    """The module of this package that `name` refers to (names may end in an imported attribute)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _matches(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations() -> list[str]:
    mods = modules()
    bad = []
    for name, path in mods.items():
        part = part_of(name)
        if part not in FORBIDDEN:
            continue
        parts_forbidden, libs_forbidden = FORBIDDEN[part]
        for imp in sorted(imports_of(name, path)):
            target = _known(mods, imp)
            if target is not None and target.startswith(PKG + "."):
                tpart = part_of(target)
                head = target.split(".")[1]
                if head in parts_forbidden or tpart in parts_forbidden:
                    bad.append(f"{name} ({part}) imports {target}")
                allowed = ONLY_FROM.get(part, {}).get(head)
                if allowed is not None and target not in allowed:
                    bad.append(f"{name} ({part}) imports {target}; only {sorted(allowed)} is allowed from {head}/")
                if name in HOOK_CORE and tpart not in ("vocab", "plugins"):
                    bad.append(f"{name} (hook specs / manager) imports {target}")
            elif target is None and _matches(imp, libs_forbidden):
                bad.append(f"{name} ({part}) imports {imp}")
    return bad


def cycles() -> list[list[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = {_known(mods, i) for i in imports_of(name, path)}
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")
                       and not (mods[d].name == "__init__.py" and d in name)}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if mods[dep].name == "__init__.py" and dep != PKG and part_of(dep) == part_of(node):
                continue  # a module importing its own package's __init__ (re-exports) is not a design cycle
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_parts_import_only_what_the_layout_allows():
    assert violations() == []


def test_no_import_cycles_between_modules():
    real = [c for c in cycles() if PKG not in (c[0], c[-2])]  # the root re-exports; it is nobody's dependency
    assert real == []


PRIVATE = {"_offload_runtime", "_runtime_or_raise", "_runtime"}  # the runtime's state, for runtime/ only
CACHE_INTERNALS = {"pools", "pool_of", "listeners", "prefix"}  # what faces once read of the cache


def private_reads() -> list[str]:
    """`module:line attribute` for every read of the runtime's private state outside runtime/ (and of the cache's
    internals in a face)."""
    bad = []
    for name, path in modules().items():
        part = part_of(name)
        if part in ("runtime", None):
            continue
        watched = PRIVATE | (CACHE_INTERNALS if part == "face" else set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in watched:
                bad.append(f"{name}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Constant) and node.value in PRIVATE:  # getattr(model, "_offload_runtime")
                bad.append(f"{name}:{node.lineno} {node.value!r}")
    return bad


def test_no_face_or_tool_reads_private_runtime_state():
    assert private_reads() == []


def test_the_private_state_checker_catches_a_read(tmp_path, monkeypatch):
    real = modules()
    fake = tmp_path / "x.py"
    fake.write_text("def f(model):\n    return model._offload_runtime.cache.pools\n")
    monkeypatch.setitem(globals(), "modules", lambda: {**real, f"{PKG}.demo.x": fake})
    assert {f"{PKG}.demo.x:2 ._offload_runtime", f"{PKG}.demo.x:2 .pools"} <= set(private_reads())


def test_each_part_states_its_rules():
    for part in ("runtime", "cache", "storage", "quant", "kernels", "models", "plugins", "tools", "demo", "webui",
                 "serve"):
        doc = ast.get_docstring(ast.parse((ROOT / PKG / part / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 15, f"{part}/__init__.py needs a docstring saying what it does"
    for part in ("runtime", "cache", "storage", "models", "tools"):
        doc = ast.get_docstring(ast.parse((ROOT / PKG / part / "__init__.py").read_text()))
        assert "must not import" in doc, f"{part}/__init__.py must say what it must not import"


@pytest.mark.parametrize("source,expected", [
    ("from ..runtime.loading import load_model\n", f"{PKG}.cache.x (cache) imports {PKG}.runtime.loading"),
    ("import gradio\n", f"{PKG}.cache.x (cache) imports gradio"),
    ("from torch import nn\n", f"{PKG}.cache.x (cache) imports torch.nn"),
])
def test_the_checker_catches_a_broken_rule(tmp_path, monkeypatch, source, expected):
    """A module added to cache/ that imports the runtime, gradio or torch.nn is reported."""
    real = modules()
    fake = tmp_path / "x.py"
    fake.write_text(source)
    monkeypatch.setitem(globals(), "modules", lambda: {**real, f"{PKG}.cache.x": fake})
    assert expected in violations()


def test_the_checker_catches_a_cycle(tmp_path, monkeypatch):
    real = modules()
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import f\n")
    b.write_text("from .a import g\n")
    monkeypatch.setitem(globals(), "modules", lambda: {**real, f"{PKG}.tools.a": a, f"{PKG}.tools.b": b})
    assert [f"{PKG}.tools.a", f"{PKG}.tools.b", f"{PKG}.tools.a"] in cycles()
