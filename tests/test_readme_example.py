"""The README's example, as written, against `localist serve` with no --model (the default model).

The code block under "## Call it" is taken from README.md and run unchanged (it reads the server's
address from $LOCALIST_BASE_URL, which the test sets): its answer must name the one rule that
decides the case with that rule's outcome, and that rule must hold the largest share of the answer's
attention among the rule blocks. The case is written to be decided by exactly one rule; it is not
tuned to what any model answers.
"""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from conftest import free_port, serving
from default_model_cache import CACHE, built_default_model

from localist.model.default_model import DEFAULT_MODEL_NAME
from localist.model.rulebooks import SYSTEM, parse_answer

README = Path(__file__).resolve().parents[1] / "README.md"
RULE, OUTCOME = "LEND-2", "refer"  # the case: a 60,000 EUR personal loan, 15 % debt ratio, applicant aged 41


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Call it\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_is_the_fine_tuned_task_with_each_rule_a_block():
    """What the example sends, without sending it: the model's own instruction, its served name, and
    blocks that are exactly the rule lines and the case."""
    code = readme_example()
    prefix = code[:code.index("r = client.chat.completions.create(")]
    scope: dict = {}
    exec(compile(prefix, str(README), "exec"), scope)  # builds the client object; sends nothing
    assert scope["instruction"] == SYSTEM
    assert f'model="{DEFAULT_MODEL_NAME}"' in code
    user = scope["header"] + "".join(scope["lines"]) + scope["case"]
    spans = {b["label"]: user[b["start"]:b["end"]] for b in scope["blocks"]}
    assert spans == {**{label: f"[{label}] {text}\n" for label, text in scope["rules"].items()}, "case": scope["case"]}
    assert len(scope["rules"]) >= 3 and RULE in scope["rules"]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> str:
    """`localist serve` without --model, its home the test cache that holds the merged default model; a
    fresh audit store, so local dev mode (the example's api_key="dev") is on."""
    built_default_model()  # merged before the server starts, so that its start-up timeout covers only the engine
    root = tmp_path_factory.mktemp("readme-example")
    port = free_port()
    args = ["--db", f"sqlite:///{root / 'audit.db'}", "--no-signing", "--max-model-len", "2048"]
    with serving(args, port, root / "server.log", CACHE):
        yield f"http://127.0.0.1:{port}"


def test_readme_example_as_written_answers_with_the_deciding_rule(default_server, monkeypatch, capsys):
    models = httpx.get(f"{default_server}/v1/models", headers={"Authorization": "Bearer dev"}, timeout=30).json()
    assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL_NAME]
    monkeypatch.setenv("LOCALIST_BASE_URL", default_server)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), scope)
    printed = capsys.readouterr().out
    answer = scope["r"].choices[0].message.content
    print(printed)  # shown with -s: what the README's example printed
    assert printed.startswith(answer)
    assert parse_answer(answer) == (OUTCOME, RULE), f"the default model answered {answer!r}"
    shares = {label: scope["attribution"][label] for label in scope["rules"]}
    assert max(shares, key=shares.get) == RULE, f"attention shares of the rules: {shares}"
