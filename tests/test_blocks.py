"""Block specification: builders, tokenisation per block, and clear errors (docs/theory.md §1, §8)."""
import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from localist.model.blocks import (
    MAX_BLOCKS, BlockError, BlockTable, LocalistParams, Piece, Span, resolve_rho, table_from_chat,
    table_from_spans, table_from_texts,
)
from localist.model.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def decode(tok, table, block):
    return tok.decode(table.token_ids[block.start:block.end])


def test_texts_each_block_tokenised_alone(tok):
    texts = [Piece("Rule R1: loans above 50000", "R1", "rule"), Piece("EUR need approval.", "D1", "document")]
    table = table_from_texts(tok, texts)
    assert [b.kind for b in table.blocks] == ["sink", "rule", "document", "response"]
    assert table.blocks[0].pinned
    pieces = [tok(piece.text, add_special_tokens=False).input_ids for piece in texts]
    assert table.token_ids == pieces[0] + pieces[1]  # this tokenizer adds no BOS, so none is added
    assert table.token_ids[table.blocks[2].start:table.blocks[2].end] == pieces[1]
    assert table.block_ids() == [0] + [1] * (table.blocks[1].end - 1) + [2] * (table.blocks[2].end - table.blocks[2].start)
    assert table.candidates() == [False, True, True, False]


def test_prompt_carries_exactly_the_special_tokens_the_tokenizer_adds(tok, tmp_path):
    """The sink is the prompt's own first token: BOS only where the tokenizer itself adds one."""
    text = "Rule R1: loans above 50000 EUR need approval."
    assert table_from_texts(tok, [Piece(text, "q", "question")]).token_ids == tok(text).input_ids
    tok.save_pretrained(tmp_path)
    with_bos = AutoTokenizer.from_pretrained(tmp_path)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", with_bos.bos_token_id)])
    assert with_bos(text).input_ids[0] == with_bos.bos_token_id
    table = table_from_texts(with_bos, [Piece(text[:8], "R1", "rule"), Piece(text[8:], "q", "question")])
    assert table.token_ids[0] == with_bos.bos_token_id and table.blocks[0].kind == "sink"
    assert table.token_ids[1:] == tok(text[:8]).input_ids + tok(text[8:]).input_ids
    messages = [{"role": "user", "content": text}]
    chat = table_from_chat(with_bos, messages)  # the template renders its BOS; none is added on top
    rendered = with_bos.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.token_ids == with_bos(rendered, add_special_tokens=False).input_ids


def test_chat_template_tokens_go_to_the_message_they_introduce(tok):
    messages = [{"role": "system", "content": "Rule R1: loans."}, {"role": "user", "content": "Which rule?"}]
    table = table_from_chat(tok, messages)
    assert tok.decode(table.token_ids) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    sink, system, user, response = table.blocks
    assert decode(tok, table, sink) == "<s>"
    assert decode(tok, table, system) == "<|system|>\nRule R1: loans.</s>\n"
    assert decode(tok, table, user) == "<|user|>\nWhich rule?</s>\n"
    assert decode(tok, table, response) == "<|assistant|>\n"
    assert (system.kind, user.kind, response.kind) == ("system", "user", "response")


def test_char_spans_inside_a_message_stay_contiguous(tok):
    content = "Rule R1: loans. Rule R2: ids."
    table = table_from_chat(tok, [{"role": "system", "content": content}],
                            spans={0: [Span(16, 29, "R2", "rule"), Span(0, 15, "R1", "rule")]})
    labels = [b.label for b in table.blocks]
    assert labels == ["sink", "system-0", "R1", "system-0.1", "R2", "system-0.2", "response"]
    assert decode(tok, table, table.blocks[table.index("R1")]) == "Rule R1: loans."
    assert decode(tok, table, table.blocks[table.index("R2")]) == "Rule R2: ids."


def test_spans_in_a_plain_text(tok):
    text = "Policy. Rule R4: dose below 4 g. End."
    table = table_from_spans(tok, text, [Span(8, 32, "R4", "rule")])
    assert [b.kind for b in table.blocks] == ["sink", "text", "rule", "text", "response"]
    assert decode(tok, table, table.blocks[2]) == "Rule R4: dose below 4 g."


@pytest.mark.parametrize("spans, field, words", [
    ([Span(0, 10, "a"), Span(5, 12, "b")], "spans[1]", "overlaps"),
    ([Span(3, 3, "a")], "spans[0]", "empty"),
    ([Span(0, 99, "a")], "spans[0]", "outside"),
])
def test_bad_spans_name_the_span(tok, spans, field, words):
    with pytest.raises(BlockError) as err:
        table_from_spans(tok, "Rule R1: loans above 5", spans)
    assert err.value.field == field and words in err.value.message


def test_block_limit(tok):
    texts = [Piece(f"Rule {i}.", f"R{i}", "rule") for i in range(MAX_BLOCKS)]
    with pytest.raises(BlockError, match=f"limit of {MAX_BLOCKS}"):
        table_from_texts(tok, texts)
    assert table_from_texts(tok, texts, max_blocks=MAX_BLOCKS + 2).num_blocks == MAX_BLOCKS + 2


def test_duplicate_and_empty_labels(tok):
    with pytest.raises(BlockError, match="duplicate label"):
        table_from_texts(tok, [Piece("a", "x", "rule"), Piece("b", "x", "rule")])
    with pytest.raises(BlockError) as err:
        table_from_texts(tok, [Piece("a", "x", "rule"), Piece("", "y", "rule")])
    assert err.value.field == "blocks[1].text"


def test_dial_resolution():
    assert resolve_rho("localist", 3) == [0.9] * 3
    assert resolve_rho(0.25, 2) == [0.25, 0.25]
    assert resolve_rho([0.0, 1.0], 2) == [0.0, 1.0]
    for bad, field in [(1.5, "locality"), (float("nan"), "locality"), (float("inf"), "locality"),
                       ([0.1], "locality"), ([0.1, "x"], "locality[1]"), ("sharp", "locality"), (True, "locality")]:
        with pytest.raises(BlockError) as err:
            resolve_rho(bad, 2)
        assert err.value.field == field


def test_params_round_trip_and_bare_token_spans(tok):
    table = table_from_texts(tok, [Piece("Rule R1: x", "R1", "rule"), Piece(" Q?", "q", "question")])
    params = LocalistParams([0.5, 0.5], table.to_wire(), "req-1", target=1, audit="per_token")
    back = LocalistParams.from_json(params.to_json(), num_layers=2)
    assert back == params
    assert back.table(len(table.token_ids)).blocks == table.blocks
    bare = LocalistParams.from_json('{"rho": 0.3, "blocks": [[3, 5], [7, 9, "rule"]]}', num_layers=2)
    t = bare.table(12)
    assert [(b.kind, b.start, b.end) for b in t.blocks] == [
        ("sink", 0, 1), ("text", 1, 3), ("document", 3, 5), ("text", 5, 7), ("rule", 7, 9), ("text", 9, 12),
        ("response", 12, 12)]
    with pytest.raises(BlockError) as err:
        LocalistParams.from_json('{"blocks": [[3, 20]]}', 2).table(12)
    assert err.value.field == "localist.blocks[0]"
    with pytest.raises(BlockError) as err:
        LocalistParams([0.0, 0.0], table.to_wire(), "r", target=2).table(len(table.token_ids))
    assert err.value.field == "localist.target"


def test_wire_validation_catches_gaps():
    with pytest.raises(BlockError, match="contiguous"):
        BlockTable.from_wire([[0, 1, "sink", 1, 0], [2, 4, "rule", 0, 0], [4, 4, "response", 0, 0]], list(range(4)))
