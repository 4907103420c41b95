"""The package's shape: the stage folders install as camlabel.*, and import each other relatively."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pipeline", "workers", "schemas")


def absolute_imports(node: ast.AST) -> list[str]:
    """The modules an import statement names, unless it is relative."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []


@pytest.mark.parametrize("path", sorted(p for stage in STAGES for p in (ROOT / stage).glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_package_modules_never_import_the_bare_stage_names(path):
    # a bare `from workers.boxes import ...` works from the repository root and breaks once installed
    for node in ast.walk(ast.parse(path.read_text())):
        for name in absolute_imports(node):
            assert name.split(".")[0] not in STAGES, f"{path.name}:{node.lineno} imports {name}; use a relative import"


def test_the_schemas_import_no_other_stage_and_no_torch():
    for path in (ROOT / "schemas").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                pytest.fail(f"schemas/{path.name}:{node.lineno} imports from {'.' * node.level}{node.module}")
            for name in absolute_imports(node):
                assert name.split(".")[0] not in ("torch", "torchvision", "ray", "camlabel"), \
                    f"schemas/{path.name}:{node.lineno} imports {name}"


def test_installed_as_camlabel_namespace():
    import camlabel.pipeline.cli
    import camlabel.workers.annotator

    assert camlabel.pipeline.cli.__name__ == "camlabel.pipeline.cli"
    assert Path(camlabel.workers.annotator.__file__).resolve() == ROOT / "workers" / "annotator.py"


def test_parsing_a_config_and_the_cli_import_no_torch():
    """Config parsing, `camlabel --help` and the commands that need no model start in a fraction of a
    second: torch (seconds to import) loads only where a model runs."""
    import subprocess
    import sys

    code = ("import sys, camlabel.schemas.config as c; c.load_config(None, {'source': 'x', 'out': 'y'}); "
            "import camlabel.pipeline.cli; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_the_vocabulary_is_what_the_workers_implement():
    from camlabel.schemas.config import RULES
    from camlabel.workers.boxes import RULES as BOX_RULES
    from camlabel.workers.heatmaps import GRADIENT_METHODS, METHODS

    assert set(BOX_RULES) == set(RULES)
    assert set(GRADIENT_METHODS) < set(METHODS)


def test_the_cli_says_the_version_pyproject_declares(capsys):
    import tomllib

    from camlabel.pipeline.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.value.code == 0 and capsys.readouterr().out == f"camlabel {declared}\n"


def test_the_suites_capsys_drops_what_ray_forwards_and_nothing_of_camlabels(capsys):
    """Lines printed by Ray's own forwarding (its format, not a copy of it) are dropped; camlabel's stay."""
    from ray._private.worker import print_worker_logs

    for pid, actor in (("raylet", None), (4242, "MapWorker(MapBatches(Annotator))"), (4243, None)):
        print_worker_logs({"pid": pid, "actor_name": actor, "ip": "10.0.0.2", "localhost": "10.0.0.1",
                           "lines": ["disk (/tmp) is over 95% full"]}, sys.stderr)
    print("camlabel annotate: out: (pid=1) a message of ours", file=sys.stderr)
    assert capsys.readouterr().err == "camlabel annotate: out: (pid=1) a message of ours\n"
