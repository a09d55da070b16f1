"""The layering of docs/ARCHITECTURE.md holds: no module imports a package of a higher layer, and no two
packages import each other (directly or round a longer loop).

Every module under ``src/posttrain`` is parsed with ``ast`` and every import counts: at the top, inside
functions (a lazy import is still a dependency, only a deferred one), under ``if TYPE_CHECKING``, relative
or absolute. A "package" here is a subpackage (``data/``, ``train/``, ...) or a top-level module
(``records.py``, ``config.py``, ``hub.py``). Imports inside one package are its own business.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "posttrain"

#: Lowest first. A package may import packages of its own layer and of any lower one, never a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the package's own __init__ (every import of posttrain.x runs it), the records every stage shares, the cache root
    ("posttrain", "records", "cache_root"),
    ("hub",),  # hub repo ids, revisions, the local hub cache (imports nothing of ours)
    ("config",),  # typed configs, YAML and overrides (imports hub)
    ("data",),  # read, check, render, mask, pack, cache; prompt sets
    ("verify",),  # verifiers, IFEval scoring
    ("models",),  # loading, adapters, the zoo, fetching
    ("generate",),  # decoding, the server, the client backend
    ("steer",),  # activation steering, attention boosting
    ("train",),  # the training loops
    ("synth",),  # verifiable prompts, labelling: sample with generate, score with verify or a reward model from train
    ("eval",),  # IFEval and other evaluations
    ("pipeline", "demo"),  # multi-stage runs
    ("cli",),  # `posttrain <group>`: highest, imports what it calls
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}

#: Upward imports the code makes today, each named by (importing module, imported module), with why it is
#: there and what would remove it. Exempt from both checks; one that no longer occurs fails
#: test_exceptions_still_exist, so that the list shrinks as they are fixed.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("posttrain.config", "posttrain.models.load"): (
        # config -> models while models/adapters.py imports config's AdapterConfig and ModelConfig: a cycle.
        "config's resource check (check_resources, model_problem), run by load_config so that a bad config lists "
        "every problem at once before any model loads, resolves model names (zoo, fetched, hub, local) and asks "
        "whether QLoRA's quantization can run here: both are models/load.py's knowledge. Removing it means moving "
        "the resource check above models/ (and load_config's call to it into its callers), or the name resolution "
        "below config."
    ),
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. posttrain.train.grpo
    imported: str  # dotted module name, e.g. posttrain.synth.label
    where: str  # file:line

    @property
    def edge(self) -> tuple[str, str]:
        return package_of(self.importer), package_of(self.imported)


def package_of(module: str) -> str:
    """``posttrain.train.grpo`` -> ``train``; ``posttrain.records`` -> ``records``; ``posttrain`` -> ``posttrain``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    """Whether dotted ``name`` (under ``root``'s package) is a module or package on disk."""
    path = root.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(root: Path) -> list[Import]:
    """Every import of ``root``'s package made by a module under ``root``, lazy ones included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}"
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the importer's package, up level - 1
                    base = importer.split(".") if is_package else importer.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from posttrain.models import zoo` imports the module posttrain.models.zoo
                targets = [f"{source}.{a.name}" if is_module(f"{source}.{a.name}", root) else source for a in node.names]
            found += [Import(importer, t, where) for t in dict.fromkeys(targets) if t == root.name or t.startswith(root.name + ".")]
    return found


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports of a package of a higher layer than the importer's (exceptions left out), as readable lines."""
    bad = []
    for imp in imports:
        low, high = imp.edge
        if (imp.importer, imp.imported) in EXCEPTIONS or low not in RANK or high not in RANK:
            continue
        if RANK[high] > RANK[low]:
            bad.append(f"{imp.where}: {imp.importer} ({low}, layer {RANK[low]}) imports {imp.imported} ({high}, layer {RANK[high]})")
    return bad


def package_cycles(imports: list[Import]) -> list[list[str]]:
    """Cycles in the package graph (exceptions left out): each as its packages in order, the first repeated at the end."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        a, b = imp.edge
        if a != b and (imp.importer, imp.imported) not in EXCEPTIONS:
            graph[a].add(b)
    cycles, state = [], {}  # state: 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def explain(cycle: list[str], imports: list[Import]) -> str:
    steps = []
    for a, b in pairwise(cycle):
        first = next(imp for imp in imports if imp.edge == (a, b))
        steps.append(f"  {a} -> {b}: {first.where} imports {first.imported}")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


IMPORTS = imports_of(SRC)


def test_every_package_has_a_layer() -> None:
    packages = {package_of(imp.importer) for imp in IMPORTS} | {package_of(imp.imported) for imp in IMPORTS}
    packages |= {package_of(module_name(p, SRC)) for p in SRC.rglob("*.py")}
    assert not packages - set(RANK), f"packages with no layer in LAYERS: {sorted(packages - set(RANK))}"


def test_no_module_imports_a_higher_layer() -> None:
    bad = upward_imports(IMPORTS)
    assert not bad, f"{len(bad)} upward import(s) (see LAYERS; lower layers never import upper ones):\n" + "\n".join(bad)


def test_no_import_cycle_between_packages() -> None:
    cycles = package_cycles(IMPORTS)
    assert not cycles, "import cycles between packages:\n" + "\n".join(explain(c, IMPORTS) for c in cycles)


def test_exceptions_still_exist() -> None:
    made = {(imp.importer, imp.imported) for imp in IMPORTS}
    assert not set(EXCEPTIONS) - made, f"exceptions no longer needed, remove them: {sorted(set(EXCEPTIONS) - made)}"


def test_the_checks_see_lazy_relative_and_from_imports(tmp_path: Path) -> None:
    """The checker itself: a lazy upward import inside a function, a relative one, and the cycle they make, are all found."""
    root = tmp_path / "posttrain"
    for package in ("train", "synth"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "records.py").write_text("")
    (root / "train" / "grpo.py").write_text("from posttrain.records import Record\n\ndef f():\n    from posttrain.synth.label import x\n")
    (root / "synth" / "label.py").write_text("from ..train import grpo\nfrom . import other\n")
    (root / "synth" / "other.py").write_text("import posttrain.records\n")
    imports = imports_of(root)
    assert {(imp.importer, imp.imported) for imp in imports} == {
        ("posttrain.train.grpo", "posttrain.records"),
        ("posttrain.train.grpo", "posttrain.synth.label"),
        ("posttrain.synth.label", "posttrain.train.grpo"),
        ("posttrain.synth.label", "posttrain.synth.other"),
        ("posttrain.synth.other", "posttrain.records"),
    }
    (bad,) = upward_imports(imports)
    assert bad.startswith("posttrain/train/grpo.py:4: posttrain.train.grpo (train, layer 8) imports posttrain.synth.label")
    assert package_cycles(imports) == [["synth", "train", "synth"]]
