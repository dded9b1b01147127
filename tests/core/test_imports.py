"""The dependency direction, read from the source (ast): every import, at module level or inside
a function, goes from a layer to itself or a layer below, and no two modules import each other
except autograd and functional (autograd looks up its operators in functional lazily)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("tritnet_kernels", "tritnet", "cli")

# Lowest first. A module belongs to the layer of its longest listed prefix; a tritnet module
# listed nowhere belongs to "runtime" (the layer of the training loop and its tools).
LAYERS = [
    ("kernels", ["tritnet_kernels"]),
    ("core", ["tritnet", "tritnet.errors", "tritnet.backend", "tritnet.rng", "tritnet.autograd",
              "tritnet.functional", "tritnet.gradcheck", "tritnet.data"]),
    ("nn", ["tritnet.nn"]),
    ("models", ["tritnet.config", "tritnet.models"]),
    ("optim", ["tritnet.optim"]),
    ("runtime", ["tritnet.train", "tritnet.distributed", "tritnet.capture", "tritnet.checkpoint",
                 "tritnet.sample"]),
    ("cli", ["cli"]),
]
ALLOWED_CYCLES = [{"tritnet.autograd", "tritnet.functional"}]


def _modules():
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name, path, modules):
    """{imported module: the private names taken from it} for every import in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in modules:   # `from . import backend`: the module itself
                    out.setdefault(full, set())
                else:
                    names = out.setdefault(target, set())
                    if alias.name.startswith("_"):
                        names.add(alias.name)
    return {m: names for m, names in out.items() if m in modules and m != name}


def _layer(name):
    best, rank = None, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and \
                    (best is None or len(prefix) > len(best)):
                best, rank = prefix, i
    if rank is None or (best == "tritnet" and name != "tritnet"):
        rank = [n for n, _ in LAYERS].index("runtime")
    return rank


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_imports_go_down_the_layers():
    wrong = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
             for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles_but_autograd_and_functional():
    graph = {a: set(targets) for a, targets in _graph().items()}
    cycles = []
    for a, targets in graph.items():
        for b in targets:
            # a -> b and b ->* a: one cycle through the edge a -> b
            seen, stack = set(), [b]
            while stack:
                m = stack.pop()
                if m == a:
                    pair = {a, b}
                    if not any(pair <= allowed for allowed in ALLOWED_CYCLES):
                        cycles.append(f"{a} -> {b} -> ... -> {a}")
                    break
                if m not in seen:
                    seen.add(m)
                    stack.extend(graph.get(m, ()))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_kernel_modules_share_helpers_only_through_private_modules():
    """A kernel module takes private names only from the package's private modules
    (_common.py, _vq_rules.py, ...), never from another kernel module."""
    wrong = [f"{a} imports {', '.join(sorted(names))} from {b}"
             for a, targets in _graph().items() if a.startswith("tritnet_kernels")
             for b, names in targets.items()
             if names and not b.rsplit(".", 1)[-1].startswith("_")]
    assert not wrong, "\n".join(wrong)
