"""The places where vlalign depends on transformers internals stay few and listed.

Every `from transformers.<submodule> import ...` outside the documented namespaces, and every private `Trainer` /
`GenerationMixin` method our code calls or overrides, must be in vlalign/__init__.py's list (and in EXPECTED here):
adding one is a decision to write down, since it is what breaks first when transformers moves.
"""

import ast
from pathlib import Path

import transformers

import vlalign

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "src" / "vlalign").rglob("*.py")) + [REPO / "training" / "train.py"]
# documented namespaces: the top-level package, ModelOutput and constants, the output classes
PUBLIC = {"transformers", "transformers.utils", "transformers.modeling_outputs"}

EXPECTED_IMPORTS = {
    ("modeling_albef.py", "transformers.masking_utils"),
    ("modeling_albef.py", "transformers.modeling_layers"),
    ("modeling_albef.py", "transformers.models.bert.modeling_bert"),
    ("configuration_albef.py", "transformers.configuration_utils"),
    ("configuration_mivc.py", "transformers.configuration_utils"),
    ("trainer.py", "transformers.trainer_utils"),
    ("hub.py", "transformers.dynamic_module_utils"),
}
EXPECTED_PRIVATE_METHODS = {
    "_save_checkpoint",
    "_load_from_checkpoint",
    "_load_best_model",
    "_get_output_dir",
    "_prepare_inputs",
    "_build_accelerator_args",
    "_load_optimizer_and_scheduler",
    "_get_learning_rate",
}


def _internal_imports():
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                if node.module not in PUBLIC:
                    found.add((path.name, node.module))
    return found


def _private_transformers_methods():
    """Names `_x` that our code defines, or calls on self / super(), which are private methods of transformers'
    Trainer or GenerationMixin."""
    private = {
        n
        for cls in (transformers.Trainer, transformers.GenerationMixin)
        for n in dir(cls)
        if n.startswith("_") and not n.startswith("__")
    }
    used = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in private:
                used.add(node.name)
            if isinstance(node, ast.Attribute) and node.attr in private:
                used.add(node.attr)
    return used


def test_internal_imports_are_exactly_the_listed_ones():
    assert _internal_imports() == EXPECTED_IMPORTS
    for _, module in EXPECTED_IMPORTS:
        assert module.removeprefix("transformers.").split(".")[-1] in vlalign.__doc__, module


def test_private_trainer_and_generation_methods_are_exactly_the_listed_ones():
    assert _private_transformers_methods() == EXPECTED_PRIVATE_METHODS
    for name in EXPECTED_PRIVATE_METHODS:
        assert name in vlalign.__doc__, name


def test_each_internal_import_says_so_where_it_is_made():
    for path in SOURCES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("from transformers.") and stripped.split()[1] not in PUBLIC:
                nearby = " ".join(lines[max(0, number - 4) : number + 1])
                assert "transformers internal" in nearby, f"{path.name}:{number + 1}: {stripped}"
