import ast
import re
import subprocess
import sys
from pathlib import Path

import geoiso_dagster

GEO_MODULES = ("geopandas", "shapely", "pyogrio", "pyproj", "osgeo")


def test_definitions_import_no_geo_library():
    """The orchestration layer (and the CLI, the run launcher the daemon and the
    webserver load, and the public API of steps of one's own: geo_asset,
    build_definitions, the pool) must not load GDAL, GEOS or PROJ."""
    code = (
        "import sys, geoiso_dagster.definitions, geoiso_dagster.cli, geoiso_dagster.launcher;"
        "import geoiso_dagster, geoiso_dagster.pool, geoiso_dagster.components;"
        "geoiso_dagster.geo_asset, geoiso_dagster.build_definitions, geoiso_dagster.Reference;"
        f"print(','.join(m for m in {GEO_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"geo modules loaded by the orchestration layer: {out.stdout}"


def test_the_guard_can_fail():
    """The same probe does see a geo import when there is one."""
    code = (
        "import sys, geoiso_dagster.spatial.tasks;"
        f"print(','.join(m for m in {GEO_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "geopandas" in out.stdout


def _import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of `package` and the modules of it that it imports, at module level or
    inside a function (a lazy import hides a cycle, it does not break it). A module's
    own parent packages are not counted: Python imports those first anyway."""
    modules = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(f"{target}."):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = _import_graph(Path(geoiso_dagster.__file__).parent)
    assert len(graph) > 50 and graph["geoiso_dagster.spatial.stream"]  # it read the package
    assert _cycles(graph) == []


def test_the_cycle_guard_can_fail(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.a import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert _cycles(_import_graph(package)) == [["pkg.a", "pkg.b"]]


def test_worker_code_calls_into_the_task_api_not_the_pool():
    """The worker layer (spatial/, ops/) reaches progress, the errors and the GDAL jail
    below the pool (task_api.py, errors.py, gdal_jail.py), never the pool's modules."""
    graph = _import_graph(Path(geoiso_dagster.__file__).parent)
    worker_side = [
        m for m in graph if m.startswith(("geoiso_dagster.spatial", "geoiso_dagster.ops"))
    ]
    assert "geoiso_dagster.spatial.union" in worker_side
    reaching = {
        m: sorted(t for t in graph[m] if t.startswith("geoiso_dagster.pool")) for m in worker_side
    }
    assert {m: t for m, t in reaching.items() if t} == {}


def test_the_pool_names_no_module_of_the_worker_layer():
    """The pool is given its task module by its caller (PoolSettings.task_module): none
    of its modules imports spatial/ or ops/, or names one in a string (a preload list,
    a default)."""
    package = Path(geoiso_dagster.__file__).parent
    graph = _import_graph(package)
    pool = [m for m in graph if m.startswith("geoiso_dagster.pool")]
    assert "geoiso_dagster.pool._forkserver" in pool
    worker_layer = ("geoiso_dagster.spatial", "geoiso_dagster.ops")
    assert {m: sorted(t for t in graph[m] if t.startswith(worker_layer)) for m in pool} == {
        m: [] for m in pool
    }
    named = [
        path.name
        for path in (package / "pool").glob("*.py")
        if re.search(r"geoiso_dagster\.(spatial|ops)\b", path.read_text())
    ]
    assert named == []


# What asks "a folder or a bucket?": the predicates and type tests that tell the two
# kinds of data root (or a path from an object URI) apart.
_STORAGE_BRANCH = re.compile(
    r"\bis_uri\(|startswith\(\s*[\"']s3://|isinstance\([^)]*\b(S3Root|BucketRoot|LocalRoot)\b"
    r"|\bdataroot\.bucket\(\)|\bremote_root\("
)
# The data root (run side), and where a worker opens a file or an object: the only
# modules that may tell a folder from a bucket (docs/design.md, Storage).
STORAGE_MODULES = {
    "geoiso_dagster/dataroot.py",
    "geoiso_dagster/spatial/io.py",
    "geoiso_dagster/spatial/remote.py",
    "geoiso_dagster/spatial/sources.py",
}


def _storage_branches(package: Path) -> dict[str, int]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        lines = [
            line
            for line in path.read_text().splitlines()
            if _STORAGE_BRANCH.search(line) and not line.lstrip().startswith(("def ", "#"))
        ]
        if lines:
            found[path.relative_to(package.parent).as_posix()] = len(lines)
    return found


def test_storage_is_told_apart_in_four_modules_only():
    """Every other module asks the data root object (or spatial/io.py) and never
    which kind of root it has: a storage rule is written once."""
    branches = _storage_branches(Path(geoiso_dagster.__file__).parent)
    outside = {module: n for module, n in branches.items() if module not in STORAGE_MODULES}
    assert not outside, f"storage branches outside {sorted(STORAGE_MODULES)}: {outside}"
    # The pattern sees the real branches (a guard that matches nothing guards nothing).
    assert branches.keys() == STORAGE_MODULES, branches


# The modules a file passes through from the sensor's run to its published output.
STEP_PATH = ("assets", "steps", "own_steps", "envelope", "batch", "fanout", "runner")


def _hidden_flow(path: Path) -> list[str]:
    """The lambdas and nested functions of a module, by line, except geo_asset's
    `compute`: the function Dagster calls, which only hands its spec to run_step."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Lambda):
            found.append(f"{path.name}:{node.lineno} lambda")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                nested = inner is not node and isinstance(
                    inner, (ast.FunctionDef, ast.AsyncFunctionDef)
                )
                if nested and not (node.name == "geo_asset" and inner.name == "compute"):
                    found.append(f"{path.name}:{inner.lineno} {inner.name} inside {node.name}")
    return found


def test_the_step_path_has_no_lambda_or_closure():
    """A reader (and a static walk of the code) follows a file from the step to its
    published output through named functions with explicit arguments."""
    defs = Path(geoiso_dagster.__file__).parent / "defs"
    hidden = [entry for module in STEP_PATH for entry in _hidden_flow(defs / f"{module}.py")]
    assert hidden == [], hidden


def test_the_flow_guard_can_fail(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f(x):\n    def g():\n        return x\n    return lambda: g\n")
    assert sorted(_hidden_flow(module)) == ["m.py:2 g inside f", "m.py:4 lambda"]
