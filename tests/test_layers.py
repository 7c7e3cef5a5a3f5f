"""One-way layers: no module of f2d_jax imports a module of a higher layer, and no two parts of the package
import each other, directly or round about.

LAYERS lists the parts of the package from the lowest layer up. A part is a module or a package, and holds
every module under it that no longer-named part claims (the package's own name, f2d_jax, is its __init__
alone). A module may import from its own layer and those below. Every import counts, read with `ast`
(nothing is imported): at the top of a module or inside a function, absolute or relative, `import a.b`,
`from a import b` (module a.b where b is one, else a), and `importlib.import_module("f2d_jax...")` with a
literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = (
    ("base", (
        "f2d_jax",                # InputWarning
        "f2d_jax.usage",          # how every command answers: `error:` lines, exit statuses, Ctrl-C, shared flags
        "f2d_jax.config", "f2d_jax.targets", "f2d_jax.compiled", "f2d_jax.compile_cache", "f2d_jax.params",
        "f2d_jax.sharding", "f2d_jax.objectives", "f2d_jax.arcface")),
    ("inputs and weight files", (
        "f2d_jax.text",           # prompts and the tokenizer, which the Stable Diffusion models load
        "f2d_jax.text_t5",        # FLUX's T5 prompts and tokenizer
        "f2d_jax.faces",
        "f2d_jax.convert.io",     # state dicts in files
        "f2d_jax.convert.layout",  # PyTorch keys <-> Flax trees
    )),
    ("models", ("f2d_jax.models",)),  # the Flax modules, Stable Diffusion's folders
    ("model sets", (
        "f2d_jax.encoders",
        "f2d_jax.convert",        # the official checkpoints of the models, weights directories
        "f2d_jax.configs",        # the named configs, some built from the tiny models' configs
    )),
    ("runs and bundles", (
        "f2d_jax.workdir",        # reading a training run's folder
        "f2d_jax.bundle",         # every model of a config with its weights
    )),
    ("data, scores and packaged models", (
        "f2d_jax.data",
        "f2d_jax.eval",           # scoring images and reporting the scores (generating them is a layer up)
        "f2d_jax.convert.package",  # a trained model's folder; its model card shows the score reports
    )),
    ("sampling", ("f2d_jax.sampling",)),
    ("what samples or trains", (
        "f2d_jax.train",
        "f2d_jax.pretrain",       # MSID pretraining runs in the training loop
        "f2d_jax.eval.generate",  # the images to score, made by the sampling pipeline
        "f2d_jax.app",            # the web page
        "f2d_jax.demo",
        "f2d_jax.torch",          # the PyTorch side: packaged models in the official modules
    )),
    ("commands", (
        "f2d_jax.cli",
        "f2d_jax.train.launch",   # f2d-train's process set-up: runs Face2Diffusion training or MSID pretraining
        "f2d_jax.app.__main__", "f2d_jax.convert.__main__", "f2d_jax.eval.__main__",
    )),
)


PACKAGE = ROOT / "f2d_jax"


def modules(package: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of `package` (a package's own name: its __init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _names(node: ast.AST, package: str, known) -> list[str]:
    """The modules an import statement or `import_module` call names (all of them: in the package or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parent = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([node.module] if node.module else []))
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" \
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return [node.args[0].value]
    return []


def imports(name: str, path: Path, known) -> list[tuple[int, str]]:
    """(line, module) for every import of a module of the package in module `name` (its file: `path`);
    `known`: the package's module names."""
    root = name.split(".")[0]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        for imported in _names(node, package, known):
            if imported == root or imported.startswith(root + "."):
                while imported not in known and "." in imported:  # `import a.b.c` of no module c: a.b
                    imported = imported.rpartition(".")[0]
                found[node.lineno, imported] = None
    return sorted(found)


def reachable(package: Path, names) -> dict[str, str]:
    """{module: the module whose import of it is met first ("" for `names`)} of every module of `package` that
    importing `names` may import, as the imports say, inside functions too; a module's packages come with it
    (importing a.b.c runs a/__init__.py and a/b/__init__.py)."""
    known = modules(package)
    found, todo = dict.fromkeys(names, ""), list(names)
    while todo:
        name = todo.pop(0)
        parts = name.split(".")
        for imported in [".".join(parts[:i]) for i in range(1, len(parts))] + \
                [imported for _, imported in imports(name, known[name], known)]:
            if imported not in found:
                found[imported] = name
                todo.append(imported)
    return found


def part_of(module: str, layers) -> tuple[int, str] | None:
    """(layer index, part) of a module: the longest part that names it or a package above it."""
    root = module.split(".")[0]
    matches = [(len(part), index, part) for index, (_, parts) in enumerate(layers) for part in parts
               if module == part or (part != root and module.startswith(part + "."))]
    return max(matches)[1:] if matches else None


def import_graph(package: Path, layers) -> list[tuple[str, str, str, str]]:
    """(importing part, imported part, importing module, imported module with the place of the import) for
    every import between modules of `package` that both have a part."""
    known = modules(package)
    graph = []
    for name, path in known.items():
        for line, imported in imports(name, path, known):
            a, b = part_of(name, layers), part_of(imported, layers)
            if imported != name and a and b:
                graph.append((a, b, name, f"{imported} ({path.relative_to(package.parent)}:{line})"))
    return graph


def unplaced(package: Path, layers) -> list[str]:
    """The modules no part holds, the parts that hold no module, and the parts listed twice."""
    known = modules(package)
    parts = [part for _, names in layers for part in names]
    return [f"{name}: in no layer" for name in known if part_of(name, layers) is None] + \
        [f"{part}: no such module or package" for part in parts if part not in known] + \
        [f"{part}: listed twice" for part in sorted(set(parts)) if parts.count(part) > 1]


def upward_imports(package: Path, layers) -> list[str]:
    """Every import of a module of a higher layer: `importer (its layer) imports imported (its layer)`."""
    return [f"{name} ({layers[a[0]][0]}) imports {imported}, on the layer {layers[b[0]][0]!r}"
            for a, b, name, imported in import_graph(package, layers) if b[0] > a[0]]


def cycles(package: Path, layers) -> list[str]:
    """Each set of parts that import each other round about: its parts, and one import per step."""
    edges: dict[str, dict[str, str]] = {}
    for (_, a), (_, b), name, imported in import_graph(package, layers):
        if a != b:
            edges.setdefault(a, {}).setdefault(b, f"{name} imports {imported}")
    found, reported = [], set()
    for start in sorted(edges):
        if start in reported:
            continue
        before, todo = {}, [start]  # breadth first: the shortest way back to `start`
        while todo and start not in before:
            a = todo.pop(0)
            for b in sorted(edges.get(a, {})):
                if b not in before:
                    before[b] = a
                    todo.append(b)
        if start in before:
            path = [start, before[start]]
            while path[-1] != start:
                path.append(before[path[-1]])
            path.reverse()
            reported.update(path)
            found.append(" -> ".join(path) + ": " + "; ".join(edges[a][b] for a, b in zip(path, path[1:])))
    return found


def test_every_module_is_in_one_layer():
    assert unplaced(PACKAGE, LAYERS) == []


def test_no_module_imports_a_higher_layer():
    found = upward_imports(PACKAGE, LAYERS)
    assert not found, "imports of a higher layer (tests/test_layers.py lists the layers):\n" + "\n".join(found)


def test_no_parts_import_each_other():
    found = cycles(PACKAGE, LAYERS)
    assert not found, "parts of f2d_jax that import each other:\n" + "\n".join(found)


def test_the_checks_find_what_they_are_for(tmp_path):
    files = {"__init__.py": "", "low.py": "def f():\n    from pkg import high\n", "high.py": "from . import low\n",
             "stray.py": "", "a/__init__.py": "", "a/x.py": "import importlib\nimportlib.import_module('pkg.b.y')\n",
             "b/__init__.py": "", "b/y.py": "from ..a import x\n", "b/z.py": "import pkg.low\n"}
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    layers = (("low", ("pkg", "pkg.low", "pkg.a", "pkg.b")), ("high", ("pkg.high", "pkg.gone")))
    assert unplaced(tmp_path / "pkg", layers) == ["pkg.stray: in no layer", "pkg.gone: no such module or package"]
    assert upward_imports(tmp_path / "pkg", layers) == [
        "pkg.low (low) imports pkg.high (pkg/low.py:2), on the layer 'high'"]
    assert cycles(tmp_path / "pkg", layers) == [
        "pkg.a -> pkg.b -> pkg.a: pkg.a.x imports pkg.b.y (pkg/a/x.py:2); pkg.b.y imports pkg.a.x (pkg/b/y.py:1)",
        "pkg.high -> pkg.low -> pkg.high: pkg.high imports pkg.low (pkg/high.py:1); pkg.low imports pkg.high "
        "(pkg/low.py:2)"]
