"""The package layout holds: stages import only earlier stages, Ray only in ray_* modules,
nothing imports the entry points or the benchmarks, and the README's map matches the tree."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["core", "store", "extract", "aip", "sae", "evaluate", "train", "study"]


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_atoms_is_one_subpackage_per_stage():
    subpackages = {p.name for p in (ROOT / "atoms").iterdir()
                   if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages == set(STAGES)
    assert [p.name for p in (ROOT / "atoms").glob("*.py")] == ["__init__.py"]
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((ROOT / "atoms" / stage / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"atoms/{stage}/__init__.py: say what it may import"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_the_stages_before_it(stage):
    allowed = set(STAGES[: STAGES.index(stage) + 1])
    for path in modules(f"atoms/{stage}"):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "atoms" and len(parts) > 1:
                assert parts[1] in allowed, f"{path.relative_to(ROOT)} imports {name}"


def test_ray_is_imported_only_by_the_modules_that_wrap_it():
    for folder in ("atoms", "experiments", "analysis", "benchmarks"):
        for path in modules(folder):
            uses_ray = any(n == "ray" or n.startswith("ray.") for n in imports(path))
            wraps_ray = folder == "atoms" and path.name.startswith("ray_")
            assert not uses_ray or wraps_ray, f"{path.relative_to(ROOT)} imports ray"


def test_nothing_imports_the_entry_points_or_the_benchmarks():
    for folder in ("atoms", "analysis", "experiments", "benchmarks"):
        for path in modules(folder):
            for name in imports(path):
                top = name.split(".")[0]
                assert top != "experiments", f"{path.relative_to(ROOT)} imports {name}"
                if folder != "benchmarks":
                    assert top != "benchmarks", f"{path.relative_to(ROOT)} imports {name}"


def test_the_readme_map_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"^\| `atoms/(\w+)/` \|", section, flags=re.M)
    assert named == STAGES
    for stage in STAGES:
        row = re.search(rf"^\| `atoms/{stage}/` \|(.*)$", section, flags=re.M).group(1)
        groups = re.findall(r"\(((?:`\w+`(?:, )?)+)\)", row)  # (`module`) or (`a`, `b`)
        listed = {name for g in groups for name in re.findall(r"`(\w+)`", g)}
        for module in listed:
            assert (ROOT / "atoms" / stage / f"{module}.py").exists(), \
                f"README names atoms/{stage}/{module}.py, which does not exist"
        actual = {p.stem for p in (ROOT / "atoms" / stage).glob("*.py")} - {"__init__"}
        assert actual <= listed, f"README's atoms/{stage}/ row misses {sorted(actual - listed)}"
