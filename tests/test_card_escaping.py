"""Model cards built from hostile strings (issue 8, part C).

Every user-controlled string of `build_model_card` (model id, method name, base model, dataset name / description /
splits, hyperparameters, metric names and values, tags, language, license, pipeline tag, extra facts, picture
captions) is set to the same adversarial value: YAML breakers, Markdown / HTML injection, Jinja, control and
Unicode line-separator characters, very long strings. Then:

* the YAML front matter parses (yaml.safe_load and huggingface_hub's ModelCard.load) to exactly the intended values;
* there is exactly one front-matter block, and the body has the same structure (headings, lists, rules, tables,
  fences) and the same unescaped Markdown characters as a card built from a harmless value;
* the usage snippets stay valid Python that loads exactly the given model id.
"""

import ast
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from vlalign.hub import DEFAULT_TAGS, _valid_repo_id, build_model_card, save_model_card

TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
HARMLESS = "harmless"

ADVERSARIAL = {
    "front-matter-break": 'evil"\n---\nfoo: bar\n---\n# injected',
    "dashes": "---",
    "yaml-document-end": "...",
    "colon-space": "key: value",
    "comment": "# comment",
    "trailing-comment": "value # comment",
    "yaml-tag": "!python/object/apply:os.system ['ls']",
    "anchor": "&anchor value",
    "alias": "*alias",
    "flow-map": "{a: 1}",
    "flow-sequence": "[a, b]",
    "literal-block": "| literal",
    "folded-block": "> folded",
    "quotes": "it's \"quoted\" 'twice'",
    "newlines": "line1\nline2\n\nline3",
    "carriage-returns": "cr\ronly\r\nand crlf",
    "tabs": "\ttab\tseparated\t",
    "nul": "nul\x00byte",
    "unicode-line-separators": "ls\u2028ps\u2029nel\x85vt\x0bff\x0c",
    "next-line": "next\x85line\x85",  # alone, PyYAML writes NEL raw in single quotes: it read back as a space
    "line-separator": "line\u2028separator",
    "bom-and-escape": "\ufeffbom \x1b[31mred",
    "yaml-bool": "yes",
    "yaml-null": "null",
    "yaml-tilde": "~",
    "yaml-date": "2024-01-01",
    "yaml-float": "1e3",
    "yaml-hex": "0x1F",
    "long-word": "y" * 10_000,
    "long-sentence": "word " * 2_000,
    "script": "<script>alert(1)</script>",
    "html-attribute": '<img src=x onerror="alert(1)">',
    "markdown-link": "[click](javascript:alert(1))",
    "markdown-image": "![x](javascript:alert(1))",
    "autolink": "<javascript:alert(1)>",
    "entity": "&lt;script&gt;",
    "jinja-expression": "{{ card_data }} {{ 7*7 }}",
    "jinja-statement": "{% for x in range(3) %}x{% endfor %}",
    "jinja-comment": "{# hidden #}",
    "bullet": "- item",
    "ordered-item": "1. first",
    "setext": "===",
    "table-row": "| a | b |",
    "code-fence": "```python\nimport os\n```",
    "heading": "## heading",
    "backslashes": "\\ \\\\ \\n",
    "unicode": "é中文🙂 →",
}
# Markdown characters that start markup; in the body they may only come from the template, or appear escaped.
MARKUP = set("<>[]`*_|#~&$")
FRONT_MATTER = re.compile(r"^---\n(.*?)\n---\n", flags=re.DOTALL)
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def _build(value, template="tcl.md"):
    """A card with `value` in every user-controlled string."""
    return build_model_card(
        TEMPLATES / template,
        model_id=value,
        model_type_name=value,
        base_model=[value],
        dataset_name=value,
        dataset_description=value,
        dataset_split=value,
        eval_split=value,
        hyperparameters={value: value, "learning_rate": 1e-4},
        eval_results={f"recall {value}": 50.0, "i2t_recall@1": 90.0, f"note {value}": value},
        license=value,
        language=value,
        tags=[value],
        pipeline_tag=value,
        extra={value: value},
        pictures=[(value, "curve.png")],
    )


def _saved(tmp_path, value, template="tcl.md"):
    save_model_card(tmp_path, _build(value, template))
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    match = FRONT_MATTER.match(text)
    assert match, "README.md must open with one YAML front matter block"
    return text, yaml.safe_load(match.group(1)), text[match.end():]


def _outside_code(body):
    return re.sub(r"```.*?```", "", body, flags=re.DOTALL)


def _bare_markup(text):
    """Unescaped markup characters (a backslash escapes the character after it)."""
    counts, i = Counter(), 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] in MARKUP:
            counts[text[i]] += 1
        i += 1
    return counts


def _line_kind(line):
    """The Markdown block structure a line contributes (content ignored)."""
    stripped = line.strip()
    if not stripped:
        return "blank"
    if re.match(r"^#{1,6}(\s|$)", stripped):
        return "heading" + stripped.split()[0]
    if stripped.startswith(("```", "~~~")):
        return "fence"
    if re.fullmatch(r"(-[ \t]*){3,}|(=+)|(\*[ \t]*){3,}|(_[ \t]*){3,}", stripped):
        return "rule"
    if re.match(r"^([-+*]|\d{1,9}[.)])(\s|$)", stripped):
        return "list"
    if stripped.startswith("|"):
        return f"table{len(UNESCAPED_PIPE.split(stripped))}"
    if stripped.startswith((">", "<")):
        return "quote-or-html"
    return "text"


def _skeleton(body):
    return [_line_kind(line) for line in body.split("\n")]


@pytest.fixture(scope="module")
def harmless_bodies(tmp_path_factory):
    bodies = {}
    for template in ("tcl.md", "codis.md", "mivc.md"):
        _, _, body = _saved(tmp_path_factory.mktemp(template), HARMLESS, template)
        bodies[template] = body
    return bodies


@pytest.mark.parametrize("value", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_front_matter_reads_back_exactly(tmp_path, value):
    _, meta, _ = _saved(tmp_path, value)
    # nothing injected, nothing lost: only the keys we write; the base model only when it is a repo id
    # (legacy bare ids such as "yes" are), the dataset only for a namespace/name id (none of these)
    keys = {"library_name", "license", "language", "tags", "metrics", "pipeline_tag", "model-index"}
    assert set(meta) == keys | ({"base_model"} if _valid_repo_id(value) else set())
    assert meta.get("base_model", value) == value
    assert meta["library_name"] == "transformers" and meta["metrics"] == ["recall"]
    for data in (meta, ModelCard.load(tmp_path / "README.md").data.to_dict()):
        assert data["license"] == value and data["language"] == value and data["pipeline_tag"] == value
        assert data["tags"] == list(dict.fromkeys([*DEFAULT_TAGS, value.lower(), value]))  # duplicates dropped
        (entry,) = data["model-index"]
        assert entry["name"] == value
        (result,) = entry["results"]
        assert result["dataset"] == {"name": value, "type": result["dataset"]["type"], "split": value}
        assert {m["type"]: m["value"] for m in result["metrics"]} == {f"recall {value}": 50.0, "i2t_recall@1": 90.0}
        assert {m["type"]: m["name"] for m in result["metrics"]}[f"recall {value}"] == f"recall {value}"
    assert all(type(v) is str for v in (meta["license"], meta["language"], meta["pipeline_tag"]))  # no coercion


@pytest.mark.parametrize("value", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_exactly_one_front_matter_block_and_unchanged_body_structure(tmp_path, value, harmless_bodies):
    text, _, body = _saved(tmp_path, value)
    assert text.startswith("---\n")
    assert not any(_line_kind(line) == "rule" for line in body.split("\n")), "a second '---' / rule line"
    assert _skeleton(body) == _skeleton(harmless_bodies["tcl.md"])
    assert _bare_markup(_outside_code(body)) == _bare_markup(_outside_code(harmless_bodies["tcl.md"]))


@pytest.mark.parametrize("template", ["codis.md", "mivc.md"])
@pytest.mark.parametrize("value", [ADVERSARIAL[k] for k in ("front-matter-break", "dashes", "script", "bullet",
                                                             "jinja-expression", "unicode-line-separators")])
def test_other_templates_keep_their_structure(tmp_path, value, template, harmless_bodies):
    _, _, body = _saved(tmp_path, value, template)
    assert _skeleton(body) == _skeleton(harmless_bodies[template])
    assert _bare_markup(_outside_code(body)) == _bare_markup(_outside_code(harmless_bodies[template]))


def test_template_syntax_in_values_is_shown_not_run(tmp_path):
    _, _, body = _saved(tmp_path, ADVERSARIAL["jinja-expression"])
    assert "{{ card\\_data }} {{ 7\\*7 }}" in body
    assert "library_name" not in body and "49" not in body
    _, _, body = _saved(tmp_path, ADVERSARIAL["jinja-statement"])
    assert "{% for x in range(3) %}x{% endfor %}" in body


@pytest.mark.parametrize("key", ["script", "markdown-link", "autolink", "html-attribute"])
def test_html_and_links_are_escaped_text(tmp_path, key):
    _, _, body = _saved(tmp_path, ADVERSARIAL[key])
    prose = _outside_code(body)
    assert not re.search(r"(?<!\\)<(script|img|javascript)", prose)
    assert not re.search(r"(?<!\\)\]\(javascript", prose)


@pytest.mark.parametrize("value", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_usage_snippets_load_exactly_the_model_id(tmp_path, value):
    _, _, body = _saved(tmp_path, value)
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
    assert len(blocks) == 3
    loaded_ids = []
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                loaded_ids.append(ast.literal_eval(node.args[0]))
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "pipeline":
                loaded_ids.append(ast.literal_eval(next(k.value for k in node.keywords if k.arg == "model")))
    assert loaded_ids and all(loaded == value for loaded in loaded_ids)


def test_language_list_and_absent_language():
    card = build_model_card(TEMPLATES / "tcl.md", model_id="user/model", dataset_name="digits", hyperparameters={},
                            eval_results={}, language=["en", "fr"])
    assert card.data.language == ["en", "fr"]
    card = build_model_card(TEMPLATES / "tcl.md", model_id="user/model", dataset_name="digits", hyperparameters={},
                            eval_results={})
    assert "language" not in card.data.to_dict()


def test_long_local_path_or_nul_as_base_model_is_not_looked_up_as_a_file():
    for name in ("/data/" + "x" * 5000, "bad\x00name"):
        card = build_model_card(TEMPLATES / "tcl.md", model_id="user/model", dataset_name="digits",
                                hyperparameters={}, eval_results={}, base_model=name)
        assert card.data.base_model is None
