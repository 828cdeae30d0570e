"""The package's layers, enforced from the source with ``ast`` (nothing is imported or run).

Rules (docs/ARCHITECTURE.md, "Layers"):

1. Only ``ros/`` and ``bag/`` import rclpy or ROS message packages, at module level or inside a function.
2. ``model/`` imports nothing from the package outside ``model/`` and ``errors``.
3. No import cycles between the package's modules. Every import counts, a function-local one too: deferring an
   import to call time hides a cycle from the interpreter but not from a reader, and the next module-level import
   on the path makes it real. Only imports under ``if TYPE_CHECKING:`` (never executed) are left out. Importing
   ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so those count as dependencies too.
4. No module is over 500 lines.
5. No class is over 300 lines (decorators included).
6. No import inside a function (or method), except under ``if TYPE_CHECKING:`` and the optional extras of
   :data:`LOCAL_IMPORTS_ALLOWED`, the one table of exceptions: a package the package must import without is
   imported where it is used. Everything else goes at the top of the module.

Each checker is also run on small hostile source trees, so a checker that finds nothing cannot pass by accident.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "traj_forecast_ros"
ROS_PACKAGES = ("ros", "bag")  # the only sub-packages allowed to import ROS
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
# rclpy, the rosidl runtime, launch_ros and every interface package (*_msgs, *_srvs, *_interfaces, ...).
ROS_MODULE = re.compile(r"^(rclpy|rosidl_\w+|launch_ros|builtin_interfaces|\w+_(msgs|srvs|actions|interfaces))$")


@dataclass(frozen=True)
class LocalImportRule:
    """Top-level modules (names, or a pattern) that may be imported inside functions of one sub-tree, and why."""

    modules: Tuple[str, ...]  # top-level module names; empty when ``pattern`` says
    where: str  # sub-package relative to the package ("" = anywhere in it)
    why: str
    pattern: Optional[re.Pattern] = None  # matched against the top-level module name

    def allows(self, module: str, relative_path: Path) -> bool:
        """Whether ``module`` may be imported inside a function of the file at ``relative_path`` (package-relative)."""
        top = module.split(".")[0]
        inside = not self.where or relative_path.parts[0] == self.where
        return inside and (top in self.modules or (self.pattern is not None and bool(self.pattern.match(top))))


# The only imports allowed inside functions (besides ``if TYPE_CHECKING:``): optional extras that the package must
# import without. Anything else goes at the top of its module.
LOCAL_IMPORTS_ALLOWED: Tuple[LocalImportRule, ...] = (
    LocalImportRule(("robosuite", "mujoco"), "",
                    "the sim extra (scripts/setup_sim.sh), needed only to generate simulated data: the package, "
                    "data/ included, imports without it"),
    LocalImportRule((), "bag", "rclpy and ROS message packages in the offline bag tools (bag info/run/make-sample "
                               "read and write bags with rosbags, without a ROS install)", pattern=ROS_MODULE),
    LocalImportRule(("ament_index_python",), "",
                    "the ament index of a colcon install, one more place to find packaged files: pip installs and "
                    "checkouts have none"),
)


@dataclass(frozen=True)
class Import:
    """One imported module name as written (absolute), where, and whether it only runs for type checkers."""

    target: str
    line: int
    type_checking_only: bool


def module_files(root: Path, package: str = PACKAGE) -> Dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` under ``root`` (``__init__`` = the package)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_checking: bool = False) -> Iterator[Tuple[ast.AST, bool]]:
    """Every node under ``node`` with whether it sits in an ``if TYPE_CHECKING:`` body."""
    for child in ast.iter_child_nodes(node):
        inside = type_checking
        if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
            inside = True
        yield child, inside
        yield from _walk(child, inside)


def imports_of(name: str, path: Path, modules: Dict[str, Path], only: Optional[ast.AST] = None) -> List[Import]:
    """Every import in the file (or only the statement ``only``), top-level and function-local, as absolute module
    names.

    ``from pkg import name`` names the sub-module ``pkg.name`` when that is a module of the package, else ``pkg``.
    """
    is_package = path.name == "__init__.py"
    found = []
    nodes = [(only, False)] if only is not None else _walk(ast.parse(path.read_text(), str(path)))
    for node, type_checking in nodes:
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno, type_checking) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append(Import(candidate if candidate in modules else base, node.lineno, type_checking))
    return found


def package_dependencies(target: str, modules: Dict[str, Path]) -> List[str]:
    """The package modules an import of ``target`` runs: the deepest existing module and its parent packages."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules]


def ros_import_violations(root: Path, package: str = PACKAGE) -> List[str]:
    """``file:line imports X`` for each ROS import outside the ROS sub-packages."""
    modules = module_files(root, package)
    allowed = tuple(f"{package}.{sub}" for sub in ROS_PACKAGES)
    violations = []
    for name, path in modules.items():
        if name in allowed or name.startswith(tuple(sub + "." for sub in allowed)):
            continue
        for imp in imports_of(name, path, modules):
            if ROS_MODULE.match(imp.target.split(".")[0]):
                violations.append(f"{path.relative_to(root)}:{imp.line} imports {imp.target}")
    return violations


def model_layer_violations(root: Path, package: str = PACKAGE) -> List[str]:
    """``file:line imports X`` for each import by ``model/`` of a package module outside ``model/`` and ``errors``."""
    modules = module_files(root, package)
    model, allowed = f"{package}.model", {package, f"{package}.errors"}
    violations = []
    for name, path in modules.items():
        if name != model and not name.startswith(model + "."):
            continue
        for imp in imports_of(name, path, modules):
            for dependency in package_dependencies(imp.target, modules):
                if dependency not in allowed and dependency != model and not dependency.startswith(model + "."):
                    violations.append(f"{path.relative_to(root)}:{imp.line} imports {dependency}")
    return violations


def import_graph(root: Path, package: str = PACKAGE) -> Dict[str, Set[str]]:
    """``{module: package modules it imports}``, function-local imports included, ``TYPE_CHECKING`` ones not."""
    modules = module_files(root, package)
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            if not imp.type_checking_only:
                graph[name].update(d for d in package_dependencies(imp.target, modules) if d != name)
    return graph


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def long_modules(root: Path, package: str = PACKAGE, limit: int = MAX_MODULE_LINES) -> List[str]:
    """``file: N lines`` for each module over ``limit`` lines."""
    return [f"{path.relative_to(root)}: {n} lines" for path in module_files(root, package).values()
            if (n := len(path.read_text().splitlines())) > limit]


def long_classes(root: Path, package: str = PACKAGE, limit: int = MAX_CLASS_LINES) -> List[str]:
    """``file:line class Name: N lines`` for each class (nested ones too) over ``limit`` lines, decorators included."""
    found = []
    for path in module_files(root, package).values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
                if (n := node.end_lineno - first + 1) > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} class {node.name}: {n} lines")
    return found


def _function_imports(node: ast.AST, function: Optional[str] = None,
                      type_checking: bool = False) -> Iterator[Tuple[ast.AST, str]]:
    """Every import statement inside a function under ``node`` (not under ``if TYPE_CHECKING:``), with the name of
    the innermost function that holds it."""
    for child in ast.iter_child_nodes(node):
        inside = type_checking or (isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body)
        if isinstance(child, (ast.Import, ast.ImportFrom)) and function is not None and not inside:
            yield child, function
        name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        yield from _function_imports(child, name, inside)


def function_local_imports(root: Path, package: str = PACKAGE,
                           allowed: Sequence[LocalImportRule] = LOCAL_IMPORTS_ALLOWED) -> List[str]:
    """``file:line imports X inside f()`` for each import inside a function that no rule of ``allowed`` permits."""
    modules = module_files(root, package)
    violations = []
    for name, path in modules.items():
        relative = path.relative_to(root / package)
        for node, function in _function_imports(ast.parse(path.read_text(), str(path))):
            for target in dict.fromkeys(imp.target for imp in imports_of(name, path, modules, only=node)):
                if not any(rule.allows(target, relative) for rule in allowed):
                    violations.append(f"{path.relative_to(root)}:{node.lineno} imports {target} inside {function}()")
    return violations


def _listing(violations: List[str]) -> str:
    return f"{len(violations)} offender(s):\n  " + "\n  ".join(violations)


# ---------------------------------------------------------------------------------------------- the real package
def test_only_ros_and_bag_import_rclpy_or_ros_messages():
    assert ros_import_violations(REPO) == []


def test_model_imports_only_model_and_errors():
    assert model_layer_violations(REPO) == []


def test_no_import_cycles_counting_function_local_imports():
    graph = import_graph(REPO)
    assert f"{PACKAGE}.forecaster" in graph and f"{PACKAGE}.ros.forecast_node" in graph  # the walk found the tree
    assert import_cycles(graph) == []


def test_no_module_is_over_500_lines():
    offenders = long_modules(REPO)
    assert offenders == [], _listing(offenders)


def test_no_class_is_over_300_lines():
    offenders = long_classes(REPO)
    assert offenders == [], _listing(offenders)


def test_no_imports_inside_functions_but_optional_extras():
    offenders = function_local_imports(REPO)
    assert offenders == [], _listing(offenders)


def test_the_local_import_exceptions_are_one_documented_table():
    """Every exception names its modules, where it holds and why; the package keeps importing without the extras."""
    for rule in LOCAL_IMPORTS_ALLOWED:
        assert (rule.modules or rule.pattern) and len(rule.why) > 40, rule
        assert not rule.where or (REPO / PACKAGE / rule.where).is_dir(), rule
    # robosuite and mujoco stay optional: nothing imports them at the top of a module (rule 1 covers rclpy).
    top_level = [f"{path.relative_to(REPO)}:{node.lineno}" for path in module_files(REPO).values()
                 for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
                 and any(name.split(".")[0] in ("robosuite", "mujoco")
                         for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                      else [node.module or ""]))]
    assert top_level == []


def _documented_modules() -> List[str]:
    """Module paths (relative to the package) that open a ``- `path.py`:`` line of docs/ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    return re.findall(r"^- `([\w/]+\.py)`", text, flags=re.MULTILINE)


def test_architecture_doc_has_one_line_per_module():
    documented = _documented_modules()
    assert len(documented) == len(set(documented)), "a module is described twice"
    actual = {str(path.relative_to(REPO / PACKAGE)) for path in (REPO / PACKAGE).rglob("*.py")
              if path.name != "__init__.py"}
    assert sorted(actual - set(documented)) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(set(documented) - actual) == [], "docs/ARCHITECTURE.md describes modules that do not exist"


def test_architecture_doc_follows_an_image_one_existing_file_per_hop():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## An image's path", 1)[1].split("\n## ", 1)[0]
    hops = re.findall(r"^\d+\. `([\w/]+\.py)`", section, flags=re.MULTILINE)
    assert hops[0] == "ros/forecast_node.py" and hops[-1] == "model/denoiser.py" and len(hops) >= 5
    assert all((REPO / PACKAGE / hop).is_file() for hop in hops), hops


# ---------------------------------------------------------------------------------------------- hostile trees
def _tree(root: Path, files: Dict[str, str]) -> Path:
    for relative, source in {"pkg/__init__.py": "", "pkg/model/__init__.py": "", "pkg/ros/__init__.py": "",
                             **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def test_checkers_catch_a_function_local_rclpy_import_outside_the_ros_edge(tmp_path):
    root = _tree(tmp_path, {
        "pkg/cli.py": "def main():\n    import rclpy.node\n",
        "pkg/core.py": "from std_msgs.msg import String\n",
        "pkg/fine.py": "from typing import TYPE_CHECKING\nimport rosbags\nimport ament_index_python\n",
        "pkg/ros/node.py": "import rclpy\nfrom sensor_msgs.msg import Image\n",
    })
    assert ros_import_violations(root, "pkg") == ["pkg/cli.py:2 imports rclpy.node",
                                                  "pkg/core.py:1 imports std_msgs.msg"]


def test_checkers_catch_model_importing_the_layers_above(tmp_path):
    root = _tree(tmp_path, {
        "pkg/errors.py": "",
        "pkg/registry.py": "",
        "pkg/model/config.py": "from pkg.errors import E\nfrom pkg.model import layers\nfrom . import layers\n",
        "pkg/model/layers.py": "def f():\n    from pkg import registry\n",
        "pkg/model/enc.py": "from ..registry import hub\n",
    })
    assert sorted(model_layer_violations(root, "pkg")) == ["pkg/model/enc.py:1 imports pkg.registry",
                                                           "pkg/model/layers.py:2 imports pkg.registry"]


def test_checkers_catch_a_cycle_closed_by_a_function_local_import(tmp_path):
    root = _tree(tmp_path, {
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def later():\n    from pkg.c import thing\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "pkg/e.py": "import pkg.d\n",
    })
    assert import_cycles(import_graph(root, "pkg")) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_checkers_catch_a_cycle_through_a_package_init(tmp_path):
    root = _tree(tmp_path, {"pkg/model/__init__.py": "from pkg.model.vae import VAE\n",
                            "pkg/model/vae.py": "import pkg.model.layers\n", "pkg/model/layers.py": ""})
    assert import_cycles(import_graph(root, "pkg")) == [["pkg.model", "pkg.model.vae"]]


@pytest.mark.parametrize("lines, expected", [(500, []), (501, ["pkg/big.py: 501 lines"])])
def test_the_size_limit_is_500_lines(tmp_path, lines: int, expected: Optional[List[str]]):
    root = _tree(tmp_path, {"pkg/big.py": "x = 1\n" * lines})
    assert long_modules(root, "pkg") == expected


def _class_source(name: str, lines: int, indent: str = "", decorated: bool = False) -> str:
    """A class of exactly ``lines`` lines (its decorator line included when ``decorated``)."""
    body = [f"{indent}@dataclass\n"] if decorated else []
    body += [f"{indent}class {name}:\n"] + [f"{indent}    x{i} = {i}\n" for i in range(lines - 1 - len(body))]
    return "".join(body)


def test_checkers_catch_classes_over_300_lines_nested_and_decorated_ones_too(tmp_path):
    outer = "class Outer:\n" + _class_source("Inner", 301, indent="    ")  # Outer is 302 lines, Inner 301
    root = _tree(tmp_path, {
        "pkg/fine.py": _class_source("Exactly", 300) + "def long_function():\n" + "    y = 1\n" * 400,
        "pkg/big.py": "x = 1\n" + _class_source("Big", 301),
        "pkg/model/deco.py": "from dataclasses import dataclass\n" + _class_source("Deco", 301, decorated=True),
        "pkg/nested.py": outer,
    })
    assert sorted(long_classes(root, "pkg")) == ["pkg/big.py:2 class Big: 301 lines",
                                                 "pkg/model/deco.py:3 class Deco: 301 lines",
                                                 "pkg/nested.py:1 class Outer: 302 lines",
                                                 "pkg/nested.py:2 class Inner: 301 lines"]


def test_checkers_catch_imports_inside_functions_outside_the_allowed_extras(tmp_path):
    root = _tree(tmp_path, {
        "pkg/bag/__init__.py": "",
        "pkg/top.py": ("import os\ntry:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
                       "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"),
        "pkg/cli.py": ("def main():\n    import json\n    if True:\n        from pkg import top\n"
                       "class Command:\n    def run(self):\n        def inner():\n            from .top import os\n"
                       "        return inner\n"
                       "async def later():\n    import asyncio\n"),
        "pkg/typed.py": "from typing import TYPE_CHECKING\ndef f():\n    if TYPE_CHECKING:\n        import torch\n",
        "pkg/sim.py": ("def make():\n    import robosuite\n    from robosuite.controllers import load\n"
                       "    import mujoco\n    import robosuite_extras\n"),
        "pkg/bag/offline.py": ("def run():\n    from rclpy.serialization import serialize_message\n"
                               "    from sensor_msgs.msg import Image\n    import numpy\n"),
        "pkg/ros/node.py": "def spin():\n    import rclpy\n",
    })
    assert sorted(function_local_imports(root, "pkg")) == [
        "pkg/bag/offline.py:4 imports numpy inside run()",
        "pkg/cli.py:11 imports asyncio inside later()",
        "pkg/cli.py:2 imports json inside main()",
        "pkg/cli.py:4 imports pkg.top inside main()",
        "pkg/cli.py:8 imports pkg.top inside inner()",
        "pkg/ros/node.py:2 imports rclpy inside spin()",  # ROS imports are allowed inside functions in bag/ only
        "pkg/sim.py:5 imports robosuite_extras inside make()",
    ]
