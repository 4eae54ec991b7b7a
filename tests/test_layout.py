"""The package's layout: every module's imports of the package's own modules, including
those inside functions, form no cycle (the console module `attunet_keras_cli` too)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    """`{dotted name: path}` of the package's modules and the console module."""
    modules = {"attunet_keras_cli": os.path.join(ROOT, "attunet_keras_cli.py")}
    for folder, _, names in os.walk(os.path.join(ROOT, "attunet_keras")):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def _imports(path, modules):
    """The package modules that the module at `path` imports, anywhere in its body."""
    with open(path) as file:
        tree = ast.parse(file.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
    return found


def _cycle(graph):
    """One cycle of `graph` as a list of names, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # A submodule's import of its own package's __init__ is how Python loads it, not a
    # dependency of the design: only imports of modules count.
    for name in graph:
        graph[name] -= {parent for parent in graph if name.startswith(parent + ".")}
    assert len(graph) > 15 and graph["attunet_keras.cli"] == {"attunet_keras_cli"}
    assert "attunet_keras.commands" in graph["attunet_keras_cli"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
