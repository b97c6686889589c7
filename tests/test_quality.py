"""Lint and type checks are part of the suite."""

import subprocess
import sys

from master_controller.settings import REPO_ROOT


def test_ruff_lint() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "bench"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "src", "tests", "bench"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the layering: imports only point down ---------------------------------------------------

# Top-level modules and packages of master_controller, bottom layer first. A module may
# import from its own layer's other members (as long as no cycle forms) and from any layer
# below; never from above. A new top-level module must be placed here.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "ground floor",
        frozenset(
            {"__init__", "settings", "errors", "commands", "process", "steps", "digests"}
            | {"diskspace", "metrics", "capacity", "looplag", "instance"}
        ),
    ),
    ("store", frozenset({"store"})),
    (
        "below the runtimes",
        frozenset({"images", "network", "vault", "credentials", "auth", "backup"}),
    ),
    ("runtimes", frozenset({"runtimes"})),
    ("talking to guests", frozenset({"agent_client", "viewing"})),
    ("sessions", frozenset({"sessions", "verification"})),
    ("web", frozenset({"web"})),
    ("command line", frozenset({"cli"})),
)


def _imports() -> dict[str, set[tuple[str, str]]]:
    """Each top-level unit of master_controller -> the (unit, file) pairs it imports."""
    import ast
    from collections import defaultdict

    package = REPO_ROOT / "src" / "master_controller"
    found: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        unit = relative.parts[0].removesuffix(".py") if len(relative.parts) else "__init__"
        names: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "master_controller":
                    names += [f"master_controller.{a.name}" for a in node.names]
                else:
                    names.append(node.module)
            elif isinstance(node, ast.Import):
                names += [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "master_controller" and len(parts) > 1:
                target = parts[1] if parts[1] != "__version__" else "__init__"
                if target != unit:
                    found[unit].add((target, str(relative)))
            if parts[0] == "master_controller" and len(parts) == 1:
                found[unit].add(("__init__", str(relative)))
        found.setdefault(unit, set())
    return found


def test_imports_only_point_down() -> None:
    rank = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}
    imports = _imports()
    unplaced = sorted(set(imports) - set(rank))
    assert not unplaced, f"place these in LAYERS: {unplaced}"
    upward = [
        f"{where} ({LAYERS[rank[unit]][0]}) imports {target} ({LAYERS[rank[target]][0]})"
        for unit, targets in imports.items()
        for target, where in targets
        if rank[target] > rank[unit]
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles_between_units() -> None:
    graph = {unit: {t for t, _ in targets} for unit, targets in _imports().items()}
    done: set[str] = set()

    def visit(unit: str, path: tuple[str, ...]) -> None:
        assert unit not in path, "import cycle: " + " -> ".join((*path, unit))
        if unit in done:
            return
        for target in graph.get(unit, ()):
            visit(target, (*path, unit))
        done.add(unit)

    for unit in graph:
        visit(unit, ())


def test_the_guest_agent_never_imports_the_controller() -> None:
    agent = REPO_ROOT / "src" / "mc_agent"
    offending = [
        str(p.relative_to(agent))
        for p in agent.rglob("*.py")
        if "master_controller" in p.read_text()
    ]
    assert not offending, offending


def test_the_error_tree_in_errors_docstring_is_whole() -> None:
    """Every error class is drawn in the tree, under its real parent."""
    import inspect

    from master_controller import errors

    tree = errors.__doc__ or ""
    drawn: dict[str, str] = {}  # class -> parent, from the drawing's indentation
    stack: list[tuple[int, str]] = []
    for line in tree.splitlines():
        words = line.replace("├──", " ").replace("└──", " ").replace("│", " ").split()
        if not words or not words[0].isidentifier() or not words[0][0].isupper():
            continue
        depth = len(line) - len(line.lstrip(" │├└─"))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        drawn[words[0]] = stack[-1][1] if stack else ""
        stack.append((depth, words[0]))
    classes = {
        name: cls.__base__.__name__
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.MCError) and cls is not errors.MCError
    }
    missing = sorted(set(classes) - set(drawn))
    assert not missing, f"draw these in errors.py's tree: {missing}"
    wrong = {n: (drawn[n], p) for n, p in classes.items() if drawn[n] != p}
    assert not wrong, f"drawn under the wrong parent (drawn, real): {wrong}"
