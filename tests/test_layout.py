"""The rooms of ``clman`` and where Ray may be imported, read from the source (``ast``, nothing imported).

Rooms, low to high; a module imports only from its own room or a lower rank, at the top of the
module or inside a function alike, and no import cycle runs through clman:

    base         errors, config, storage, checkpoint, metrics, losses, optim, amp, distributed,
                 local_s3, run_lock, progress, tracking, data/, models/
    evaluate     clman/evaluate/: inference, scoring, report, calibration
    worker       clman/train/: what runs in the Ray Train workers (the loops, feed, decode, worker, selection)
    launch       clman/launch/: the driver side of a run (it builds each loop's TrainJob)
    apps         clman/tune/, clman/study/, clman/export.py: three rooms of one rank, none imports another
    cli          clman/cli.py

Ray is imported (at all, even inside a function) only in the modules of ``RAY_PLACES``; every other
module must import without Ray, so it can be used and tested where Ray is not installed or started.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clman"

# (rank, room, module prefixes): the longest matching prefix names a module's room.
ROOMS = [
    (
        0,
        "base",
        (
            "clman",
            "clman.errors",
            "clman.config",
            "clman.storage",
            "clman.checkpoint",
            "clman.metrics",
            "clman.losses",
            "clman.optim",
            "clman.amp",
            "clman.distributed",
            "clman.local_s3",
            "clman.run_lock",
            "clman.progress",
            "clman.tracking",
            "clman.data",
            "clman.models",
        ),
    ),
    (1, "evaluate", ("clman.evaluate",)),
    (2, "worker", ("clman.train",)),  # the loops, feed, decode, worker, selection: what runs in the workers
    (3, "launch", ("clman.launch",)),
    (5, "tune", ("clman.tune",)),
    (5, "study", ("clman.study",)),
    (5, "export", ("clman.export",)),
    (6, "cli", ("clman.cli",)),
]
RAY_PLACES = (
    "clman/launch/",
    "clman/train/",
    "clman/evaluate/scoring.py",
    "clman/tune/driver.py",
    "clman/study/driver.py",
)
IMPORT_RAY = re.compile(r"^\s*(import ray\b|from ray\b)", re.MULTILINE)


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module under clman/ (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _room(name: str) -> tuple[int, str]:
    best = max(
        (
            (len(p), rank, room)
            for rank, room, prefixes in ROOMS
            for p in prefixes
            if name == p or name.startswith(p + ".")
        ),
        default=None,
    )
    assert best is not None, f"{name}: in no room of tests/test_layout.py's ROOMS; add it there"
    return best[1], best[2]


def _target(name: str) -> str:
    """The clman module an import of ``name`` loads (its longest prefix that is a module)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str) -> list[tuple[str, int]]:
    """[(imported clman module, line)] of ``name``: top level and inside functions, relative ones resolved."""
    path = MODULES[name]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package_of(name, path).split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            # "from clman.launch import trainer" loads clman.launch.trainer; "from x import func" loads x
            found += [
                (f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, node.lineno)
                for alias in node.names
            ]
    return [(_target(mod), line) for mod, line in found if mod == "clman" or mod.startswith("clman.")]


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {name: [(t, line) for t, line in _imports(name) if t != name] for name in MODULES}


def _where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(ROOT)}:{line}"


def test_every_module_has_a_room():
    for name in MODULES:
        _room(name)


def _upward(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Every import of ``graph`` from a higher room, or from a sibling room of the same rank."""
    offenders = []
    for name, targets in graph.items():
        rank, room = _room(name)
        for target, line in targets:
            t_rank, t_room = _room(target)
            if t_rank > rank or t_rank == rank and t_room != room:
                offenders.append(
                    f"{_where(name, line)}: {name} ({room}, rank {rank}) imports {target} ({t_room}, rank {t_rank})"
                )
    return offenders


def test_no_import_from_a_higher_room():
    offenders = _upward(_graph())
    assert not offenders, (
        "imports against the room order of tests/test_layout.py (move the code down, or "
        "pass what it needs in):\n  " + "\n  ".join(offenders)
    )


def _cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if state.get(start):
            continue
        path, stack = [start], [iter(graph[start])]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            target = step[0]
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if not state.get(target):
                state[target] = 1
                path.append(target)
                stack.append(iter(graph.get(target, ())))
    return None


def test_no_import_cycle():
    graph = _graph()
    cycle = _cycle(graph)
    if cycle:
        lines = [
            f"{a} -> {b} ({_where(a, next(line for t, line in graph[a] if t == b))})" for a, b in zip(cycle, cycle[1:])
        ]
        raise AssertionError("import cycle among clman modules:\n  " + "\n  ".join(lines))


def test_the_checks_catch_what_they_guard():
    """An upward import and a cycle, made by hand, are found (the checks above are not vacuous)."""
    graph = _graph()
    assert _room("clman.launch.session") == (3, "launch") and _room("clman.train.feed") == (2, "worker")
    assert _room("clman.train.finetune") == (2, "worker") and _room("clman.study.driver") == (5, "study")
    assert _cycle(graph) is None
    assert _cycle({**graph, "clman.storage": [("clman.config", 1)]}) == [
        "clman.config",
        "clman.storage",
        "clman.config",
    ]
    assert _upward({"clman.storage": [("clman.launch.session", 7)]}) == [
        "clman/storage.py:7: clman.storage (base, rank 0) imports clman.launch.session (launch, rank 3)"
    ]
    assert _upward({"clman.tune.results": [("clman.study.stats", 3)]})  # siblings of one rank
    assert any(t == "clman.train.finetune" for t, _ in graph["clman.launch.trainer"])  # imports are seen
    assert any(t == "clman.launch.trainer" for t, _ in graph["clman.tune.driver"])  # inside functions too


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_ray_is_imported_only_in_its_places():
    offenders = []
    for path in MODULES.values():
        rel = _rel(path)
        if rel.startswith(RAY_PLACES):
            continue
        text = path.read_text()
        offenders += [f"{rel}:{text[: m.start()].count(chr(10)) + 1}" for m in IMPORT_RAY.finditer(text)]
    assert not offenders, f"Ray imported outside {RAY_PLACES}: {offenders}"


def test_ray_free_modules_import_without_ray():
    """Not only the text: importing every other module must not pull Ray in through another."""
    names = [name for name, path in MODULES.items() if not _rel(path).startswith(RAY_PLACES)]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'ray' not in sys.modules, f'importing {name} imported Ray'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_job_error_is_the_same_class_everywhere():
    from clman import cli
    from clman.errors import JobError
    from clman.launch import trainer

    assert trainer.JobError is JobError
    assert JobError in cli.user_errors()


def test_drivers_do_not_import_the_model_zoo_or_torchmetrics():
    """A job's driver, a Tune trial and a study trial import these modules in a fresh process each;
    torchvision (with torch._dynamo) and torchmetrics (with scipy.signal) cost ~3.5 s of CPU there and
    only the Train workers and scoring actors use them."""
    code = (
        "import sys\n"
        "import jobs.finetune, jobs.pretrain, jobs.study, jobs.tune, clman.study.driver, clman.tune.driver\n"
        "heavy = sorted(m for m in ('torchvision', 'torchmetrics', 'scipy.signal') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


RAY_INTERNAL = re.compile(r"\bray\._private\b|\bray\.[\w.]*\._internal\b|\bray\.core\.generated\b")
RAY_COMPAT = "clman/launch/ray_compat.py"


def test_ray_internals_are_used_in_ray_compat_only():
    """One module to update when a Ray upgrade moves an internal (each use there has a test that fails)."""
    offenders = []
    for rel in [_rel(p) for p in MODULES.values()] + sorted(_rel(p) for p in (ROOT / "jobs").rglob("*.py")):
        if rel == RAY_COMPAT:
            continue
        text = (ROOT / rel).read_text()
        offenders += [f"{rel}:{text[: m.start()].count(chr(10)) + 1}" for m in RAY_INTERNAL.finditer(text)]
    assert not offenders, f"Ray internals used outside {RAY_COMPAT}: {offenders}"
    assert RAY_INTERNAL.search((ROOT / RAY_COMPAT).read_text())  # the pattern still finds what it guards


def test_the_package_ray_workers_import_stays_empty():
    """Every Ray worker of a local Ray imports clman.launch.ray_compat (its setup hook), and with it the
    package's __init__: nothing but a docstring there, and ray_compat imports the standard library only."""
    tree = ast.parse((PACKAGE / "launch" / "__init__.py").read_text())
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body)
    compat = ast.parse((ROOT / RAY_COMPAT).read_text())
    top = [a.name for n in compat.body if isinstance(n, ast.Import) for a in n.names]
    top += [n.module for n in compat.body if isinstance(n, ast.ImportFrom)]
    assert all(m.split(".")[0] in sys.stdlib_module_names or m == "__future__" for m in top), top


MAX_FUNCTION_LINES = 60
SHORT_ROOMS = ("clman/train", "clman/launch", "clman/evaluate")


def long_functions(paths) -> list[str]:
    """``file:line name (N lines)`` of every function (method, nested one) longer than MAX_FUNCTION_LINES."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_sixty_lines_in_the_run_rooms():
    """The worker loops, the driver side and evaluation read in one screen a function (ruff-formatted)."""
    paths = [p for room in SHORT_ROOMS for p in sorted((ROOT / room).rglob("*.py"))]
    assert paths, SHORT_ROOMS
    assert not long_functions(paths), "split these:\n" + "\n".join(long_functions(paths))


def test_long_functions_finds_one(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert long_functions([tmp_path / "m.py"]) == [f"m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
    finally:
        ROOT = root
