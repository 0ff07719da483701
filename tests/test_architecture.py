"""The shape of the code, checked: no import cycles, no module over 500 lines, no function
over 60 (docs/architecture.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "busdx"
MODULES = sorted(p for p in SRC.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The busdx modules ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("busdx"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("busdx")}
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a package's __init__ only re-exports, so it is
    left out as a source (its imports are its members')."""
    names = {_name(p) for p in MODULES}
    graph = {}
    for path in MODULES:
        if path.name != "__init__.py":
            graph[_name(path)] = {m for m in _imports(path) if m in names and m != "busdx"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*trail, node, target]
            if target not in state and (found := visit(target, [*trail, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 40  # the check sees the whole package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# the layers of docs/architecture.md, bottom first: a module imports only from its own layer
# or the layers below it
LAYERS = {
    "foundations": "config layout errors fileio devices hardware distributed provenance templating "
    "results stats.metrics stats.calibration stats.agreement stats.likelihood data.imaging "
    "data.boxes data.dicom data.synthetic lesion.descriptors",
    "data and models": "data.datasets data.tables data.audit data.preprocess inference.model_file "
    "training.loading training.transforms training.losses networks.classifier networks.decoders "
    "networks.weights bundled runs evaluation.radiologists evaluation.local_check "
    "reporting.figures",
    "using a model": "data.inputs inference.batch inference.predictor inference.engines "
    "inference.scope networks.torch_engine networks.gradcam training.scope_fit "
    "training.feature_cache training.loop training.optimization lesion.outline pacs.dicom_out "
    "pacs.dicomweb",
    "workflows": "workflows.pipeline workflows.crossval workflows.crossfit workflows.demo "
    "workflows.calibrate workflows.head_refit workflows.adapt workflows.export workflows.cluster "
    "evaluation.evaluate evaluation.compare evaluation.segmentation reporting.model_card "
    "pacs.watch",
    "interfaces": "cli serving __main__",
}
LEVEL = {name: level for level, names in enumerate(LAYERS.values()) for name in names.split()}


def _layer_key(module: str) -> str:
    """A module's name in LAYERS: its path under busdx, or its top package for cli/serving."""
    name = module.removeprefix("busdx.")
    return name if name in LEVEL else name.split(".")[0]


def _level(module: str) -> int:
    return LEVEL[_layer_key(module)]


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    graph = _graph()
    assert {_layer_key(m) for m in graph} == set(LEVEL)  # a new module needs a layer
    upward = [(m, t) for m, targets in graph.items() for t in targets if _level(t) > _level(m)]
    assert not upward, upward


def test_inference_and_serving_never_import_training_or_workflows():
    """Not even inside a function: predicting and serving need neither (issue 29)."""
    graph = _graph()
    for module, imported in graph.items():
        if module.startswith(("busdx.inference.", "busdx.serving.")):
            assert not {m for m in imported
                        if m.startswith(("busdx.training", "busdx.workflows"))}, module  # fmt: skip


def test_low_level_modules_import_nothing_above_them():
    """The foundations (errors, files, names of files, metrics, config) know no model, no data
    and no interface; the library never imports the CLI or the service."""
    graph = _graph()
    foundations = {"busdx.errors", "busdx.fileio", "busdx.layout", "busdx.stats.metrics",
                   "busdx.stats.calibration", "busdx.config", "busdx.templating"}  # fmt: skip
    allowed = {"busdx.errors", "busdx.fileio", "busdx.layout", "busdx.hardware",
               "busdx.stats.metrics", "busdx.config", "busdx.results"}  # fmt: skip
    for module in foundations:
        assert graph[module] <= allowed, (module, graph[module] - allowed)
    for module, imported in graph.items():
        if not module.startswith(("busdx.cli", "busdx.serving", "busdx.__main__")):
            assert not {m for m in imported if m.startswith(("busdx.cli", "busdx.serving"))}, module


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p))
def test_no_module_or_function_is_too_long(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


# what predicts and serves: importing these must not load torch (seconds and gigabytes); every
# module of busdx.inference, busdx.serving and busdx.cli, and what they use. The torch model is
# loaded through busdx.networks.torch_engine only when asked for.
TORCH_FREE = [
    _name(p) for p in MODULES
    if _name(p).startswith(("busdx.inference", "busdx.serving", "busdx.cli"))
] + ["busdx.data.preprocess", "busdx.lesion.outline", "busdx.lesion.descriptors",
     "busdx.stats.likelihood", "busdx.stats.calibration", "busdx.data.dicom",
     "busdx.evaluation.evaluate", "busdx.evaluation.local_check",
     "busdx.reporting.model_card", "busdx.pacs.dicom_out", "busdx.pacs.dicomweb",
     "busdx.pacs.watch"]  # fmt: skip


def test_inference_and_serving_import_no_torch():
    script = (
        f"import sys\nfor name in {TORCH_FREE!r}:\n    __import__(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'torchvision', 'ray', 'sklearn'}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


MODEL_FILE_KEYS = ("threshold_policy", "calibration_source", "class_names", "temperature",
                   "int8_weight_bits", "exported_from", "busdx_version")  # fmt: skip


def _string_subscripts(path: Path) -> set[str]:
    """The string constants used as subscripts or ``.get`` keys in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        key = None
        if isinstance(node, ast.Subscript):
            key = node.slice
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args:
            key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.add(key.value)
    return found


def test_model_files_are_read_and_written_in_one_place():
    """Only busdx.inference.model_file loads or saves a model file (weights.py loads pretrained
    backbone weights), and no other module looks up what a model file says by string key (issue
    29)."""
    for path in MODULES:
        if _name(path) in {"busdx.inference.model_file", "busdx.networks.weights"}:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = {f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Name)}  # fmt: skip
        assert not calls & {"torch.load", "torch.save"}, path
        assert not _string_subscripts(path) & set(MODEL_FILE_KEYS), path
