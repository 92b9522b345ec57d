"""The import graph: the oracle is a leaf, the training script uses the public API only,
and the low layers (names, tables, kernels) import no API module; the README keeps its
sections and its layout names files that exist."""

import ast
import pathlib
import re

import fastbound

PACKAGE = pathlib.Path(fastbound.__file__).parent
ROOT = PACKAGE.parent
API_MODULES = {"losses", "noise", "integrate", "estimators", "schedules", "testing", "train"}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(level, dotted name) of every import in a file; ``from . import x`` gives (1, "x")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found += [(node.level, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return found


def test_reference_imports_only_torch_and_math():
    names = {name.split(".")[0] for level, name in _imports(PACKAGE / "reference.py")}
    assert names <= {"torch", "math", "__future__"}, names


def test_continuous_reference_imports_only_torch_math_and_the_discrete_oracle():
    """The continuous oracle shares the discrete oracle's Philox rounds and nothing else of ours."""
    found = set(_imports(PACKAGE / "continuous" / "reference.py"))
    ours = {(level, name) for level, name in found if level}
    assert ours <= {(2, "reference.philox4x32")}, ours
    assert {name.split(".")[0] for level, name in found if not level} <= {"torch", "math", "__future__"}, found


def test_training_script_uses_public_names_only():
    for path in (PACKAGE / "train").glob("*.py"):
        for level, name in _imports(path):
            assert level <= 1, f"{path.name} imports {name} from outside fastbound.train"
            if name.split(".")[0] == "fastbound":
                assert not any(part.startswith("_") for part in name.split(".")), f"{path.name} imports {name}"
        assert "fastbound._" not in path.read_text(), path.name


def test_low_layers_import_no_api_module():
    low = [PACKAGE / "_names.py", PACKAGE / "_harmonic.py", PACKAGE / "_validate.py", PACKAGE / "_ops.py",
           *(PACKAGE / "triton_kernels").glob("*.py")]
    for path in low:
        depth = len(path.relative_to(PACKAGE).parts)  # a relative import of this level reaches fastbound/
        for level, name in _imports(path):
            if level == depth:
                assert name.split(".")[0] not in API_MODULES, f"{path.name} imports the API module {name}"


README_SECTIONS = (
    "Quick start", "The main job", "Using the losses", "Keeping the backward free", "Errors",
    "Fused linear head", "Noise sampling", "Likelihood estimation", "Continuous data",
    "Speed and memory", "Building with CUDA", "Layout", "References",
)


def test_readme_keeps_its_sections():
    """A regenerated table must not take the sections around it along (one commit once did)."""
    headings = [line[3:] for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("## ")]
    missing = [s for s in README_SECTIONS if not any(h.startswith(s) for h in headings)]
    assert not missing, f"README.md lost its sections {missing}"


def test_readme_layout_names_existing_files():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):text.index("## References")]
    names = re.findall(r"^(csrc/[\w/.]+\.(?:h|cpp|cu)|fastbound/[\w/]+\.py)\s", layout, flags=re.M)
    assert names, "no file names found in the README's layout"
    gone = [n for n in names if not (ROOT / n).exists()]
    assert not gone, f"the README's layout names files that do not exist: {gone}"
