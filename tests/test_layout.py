"""The layout's rules, read from the source with `ast`: imports run one way, code stays small.

The allowed direction is written once, in `LAYERS`: a module may import its own folder and any
folder on a lower floor, never one on its own floor or above. Generated gRPC stubs and tests are
outside the rules (tests may import anything; nothing shipped may import the tests).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Top floor first. A floor lists folders (as import prefixes) that must not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("vidflow", "bench"),  # entry points: the CLI, `make demo`, benchmarks; nothing imports them
    ("devstack",),  # local-dev helpers: broker, service launcher, Prefect stack, sample mirror
    ("flows",),  # the Prefect flows: thin compositions of tasks
    ("tasks.stream", "tasks.depth"),  # the two pipelines, each with its Prefect tasks
    ("services.inference",),  # the gRPC service and its client
    ("protos",),  # generated stubs
    ("common",),  # shared ground: settings machinery, logs, stats, processes, files, video
)
FOLDERS = [folder for floor in LAYERS for folder in floor]
FLOOR_OF = {folder: level for level, floor in enumerate(LAYERS) for folder in floor}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200


def _source_files() -> list[Path]:
    roots = {folder.split(".")[0] for folder in FOLDERS}
    return sorted(
        path
        for root in roots
        for path in (REPO_ROOT / root).rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _folder_of(module: str) -> str | None:
    matches = [f for f in FOLDERS if module == f or module.startswith(f + ".")]
    return max(matches, key=len) if matches else None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package if is_package else package[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            imported.add(base)
            imported.update(f"{base}.{alias.name}" for alias in node.names)
    return imported


def _back_edges() -> list[str]:
    problems = []
    for path in _source_files():
        module = _module_name(path)
        source_folder = _folder_of(module)
        if source_folder is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for target in sorted(_imported_modules(tree, module, path.name == "__init__.py")):
            if _is_back_edge(source_folder, target):
                problems.append(f"{module} imports {target} ({source_folder} -> {target})")
    return problems


def _is_back_edge(source_folder: str, target: str) -> bool:
    """Whether a module of `source_folder` may not import `target`: its floor or above, not
    its own folder, or the tests."""
    if target == "tests" or target.startswith("tests."):
        return True  # not shipped: a wheel has no `tests`, so a benchmark importing it failed
    target_folder = _folder_of(target)
    if target_folder is None or target_folder == source_folder:
        return False
    return FLOOR_OF[target_folder] <= FLOOR_OF[source_folder]


def test_imports_run_one_way() -> None:
    assert _back_edges() == []


def test_every_project_module_sits_on_a_floor() -> None:
    """A new top-level package must be placed in LAYERS, or the rule above would skip it."""
    packages = {
        path.parent.name
        for path in REPO_ROOT.glob("*/__init__.py")
        if path.parent.name not in {"tests"}
    }
    placed = {folder.split(".")[0] for folder in FOLDERS}
    assert packages <= placed, f"place these in LAYERS: {sorted(packages - placed)}"
    for root in {folder.split(".")[0] for folder in FOLDERS if "." in folder}:  # tasks, services
        for path in (REPO_ROOT / root).iterdir():
            if path.is_dir() and (path / "__init__.py").exists():
                assert f"{root}.{path.name}" in FOLDERS, f"place {root}/{path.name} in LAYERS"
    loose = [p.name for p in (REPO_ROOT / "tasks").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "tasks/ holds only the per-pipeline folders"


def test_the_rule_sees_a_back_edge(tmp_path: Path) -> None:
    """The checker itself: an import from a lower floor up to a higher one is reported."""
    tree = ast.parse("from flows.depth_extraction import depth_extraction\nfrom . import x\n")
    imported = _imported_modules(tree, "tasks.depth.download", is_package=False)
    assert "flows.depth_extraction" in imported
    assert "tasks.depth.x" in imported
    assert _is_back_edge("tasks.depth", "flows.depth_extraction")  # up a floor
    assert _is_back_edge("tasks.stream", "tasks.depth.download")  # across one floor
    assert not _is_back_edge("tasks.depth", "tasks.depth.x")  # its own folder
    assert not _is_back_edge("flows", "tasks.depth.download")  # down
    assert not _is_back_edge("flows", "numpy")  # not the project's


def _oversized() -> list[str]:
    found = []
    for path in _source_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    where = path.relative_to(REPO_ROOT)
                    found.append(f"{where}:{node.lineno} {node.name} ({lines} lines > {limit})")
    return found


def test_functions_and_classes_stay_small() -> None:
    assert _oversized() == []


_IMPORT_PROBE = """
import importlib, json, logging, os, sys, threading, warnings
from pathlib import Path

third_party, project, watched = json.loads(sys.argv[1])


def files_under(roots):
    return {str(p) for root in roots for p in Path(root).rglob("*")}


for name, attributes in third_party:  # their own import-time work is not ours to judge
    try:
        module = importlib.import_module(name)
        for attribute in attributes:  # lazy attributes load on first use, submodules on import
            if getattr(module, attribute, None) is None:
                importlib.import_module(f"{name}.{attribute}")
    except ImportError:
        pass
env = dict(os.environ)
files = files_under(watched)
threads = {t.ident for t in threading.enumerate()}
filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)
for name in project:
    importlib.import_module(name)
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
started = sorted(t.name for t in threading.enumerate() if t.ident not in threads)
children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
process_wide = [
    name for name, same in (
        ("warnings filters", warnings.filters == filters),
        ("root log handlers", logging.getLogger().handlers == handlers),
    ) if not same
]
written = sorted(files_under(watched) - files)
print(json.dumps({
    "env": changed, "threads": started, "children": children, "set": process_wide,
    "written": written,
}))
"""


def test_importing_the_project_changes_nothing(tmp_path: Path) -> None:
    """No module writes the environment, starts a thread or a process, writes a file, or sets a
    process-wide warnings filter or log handler when it is imported (a flow module used to set
    Ray's variables while Prefect loaded it)."""
    import json
    import os
    import subprocess
    import sys

    project: list[str] = []
    third_party: dict[str, set[str]] = {}  # module -> names taken from it
    for path in _source_files():
        project.append(_module_name(path))
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:  # module level only: what importing it imports
            if isinstance(node, ast.Import):
                for alias in node.names:
                    third_party.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                third_party.setdefault(node.module, set()).update(a.name for a in node.names)
    outside = sorted(
        (name, sorted(names))
        for name, names in third_party.items()
        if _folder_of(name) is None and name.split(".")[0] not in {"tests", "__future__"}
    )
    # Where an import could write besides the working directory: a fresh home, temporary
    # folder and cache, looked at before and after the project's own imports.
    workdir, home, temp, cache = (tmp_path / name for name in ("cwd", "home", "tmp", "cache"))
    for folder in (workdir, home, temp, cache):
        folder.mkdir()
    watched = [str(home), str(temp), str(cache)]
    probe = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, json.dumps([outside, project, watched])],
        cwd=workdir,
        # A bare environment: the test session's own variables (conftest sets some) would hide
        # a module that sets the same ones.
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO_ROOT)}
        | {"HOME": str(home), "TMPDIR": str(temp), "XDG_CACHE_HOME": str(cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert json.loads(probe.stdout.splitlines()[-1]) == {
        "env": [],
        "threads": [],
        "children": [],
        "set": [],
        "written": [],
    }
    assert list(workdir.iterdir()) == []
