"""The task generator's ground truth: the answer comes from the target block alone."""
from dataclasses import replace

import pytest

from localist.model.data import (
    DOC_TEMPLATES, DOMAINS, PARAPHRASE_DOC_TEMPLATES, PARAPHRASE_RULE_TEMPLATES, RULE_TEMPLATES, SPLITS,
    TEST_DOC_TEMPLATES, TEST_RULE_TEMPLATES, Example, block_matches, corpus_texts, encode, examples, make_example,
    solve,
)
from localist.model.tokenizer import train_tokenizer


def with_evidence(ex: Example, label: str, **changes) -> Example:
    """The same example with one block's structured content changed."""
    evidence = tuple(replace(e, fields={**e.fields, **changes}) if e.label == label else e for e in ex.evidence)
    return replace(ex, evidence=evidence)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus_texts(0, 500), vocab_size=1024)


def test_generation_is_a_pure_function_of_seed_split_index():
    assert make_example(3, "train", 17) == make_example(3, "train", 17)
    assert make_example(3, "train", 17) != make_example(4, "train", 17)
    assert make_example(3, "train", 17) != make_example(3, "validation", 17)


@pytest.mark.parametrize("split", SPLITS)
def test_exactly_one_block_matches_and_it_is_the_target(split):
    for ex in examples(0, split, 200):
        matching = [e.label for e in ex.evidence if block_matches(e, ex.case)]
        assert matching == [ex.target]
        assert len({e.label for e in ex.evidence}) == len(ex.evidence) >= 3
        assert ex.answer.startswith(f"Case: {ex.case.key} [{ex.target}]: ")


def test_answer_is_read_from_the_target_block_text():
    for ex in examples(1, "train", 200):
        text = ex.target_block.text
        heading = "Rule on" if ex.case.family == "rule" else "File of"
        assert text.startswith(f"{heading} {ex.case.key} [{ex.target}]")  # the answer cites it as the heading does
        decision = ex.answer.rsplit(": ", 1)[1]
        assert decision in text  # the decision word or the file's value is written in the block
        if ex.case.family == "rule":
            thr = ex.target_block.fields["thr"]
            assert str(thr) in text and ex.case.value != thr
            assert str(ex.case.value) in ex.question


def test_answer_changes_with_the_target_block_and_not_with_distractors():
    changed = 0
    for ex in examples(2, "train", 100):
        for other in ex.evidence:
            if other.label == ex.target:
                continue
            edit = {"thr": 99, "above": "freeze", "below": "pay"} if other.kind == "rule" else {"values": {}}
            assert with_evidence(ex, other.label, **edit).answer == ex.answer
        if ex.case.family == "rule":
            f = ex.target_block.fields
            # move the limit to the other side of the case value: the decision must flip
            flipped = with_evidence(ex, ex.target, thr=ex.case.value + 1 if ex.case.value > f["thr"] else ex.case.value - 1)
            if f["above"] != f["below"]:
                assert flipped.answer != ex.answer
                changed += 1
        else:
            values = dict(ex.target_block.fields["values"])
            values[ex.case.field] = values[ex.case.field] % 89 + 10  # another two-digit value
            assert with_evidence(ex, ex.target, values=values).answer != ex.answer
            changed += 1
    assert changed == 100


def test_the_word_before_the_id_tells_the_blocks_apart():
    """The lookup matches the entity's (or person's) last word: no two blocks of an example share it."""
    last_words = [e.split()[-1] for domain in DOMAINS.values() for e in domain[2]]
    assert len(set(last_words)) == len(last_words)
    for ex in examples(0, "train", 300):
        keys = [e.fields["entity"] if e.kind == "rule" else e.fields["name"] for e in ex.evidence]
        assert len({k.split()[-1] for k in keys}) == len(keys)


def test_solve_refuses_a_block_about_something_else():
    ex = make_example(0, "train", 5)
    other = next(e for e in ex.evidence if e.label != ex.target)
    with pytest.raises(ValueError, match=other.label):
        solve(other, ex.case)


def test_test_split_uses_only_held_out_templates():
    seen = {"train": set(), "validation": set(), "test": set()}
    for split in SPLITS:
        for ex in examples(0, split, 300):
            seen[split] |= {(e.kind, e.template) for e in ex.evidence}
    held_out = {("rule", t) for t in TEST_RULE_TEMPLATES} | {("document", t) for t in TEST_DOC_TEMPLATES}
    assert seen["test"] == held_out
    assert not (seen["train"] | seen["validation"]) & held_out
    assert len(RULE_TEMPLATES) == 28 and len(DOMAINS) == 4


def test_paraphrases_widen_training_phrasings_and_leave_the_test_split_alone():
    paraphrased = {"train": set(), "validation": set()}
    for split in paraphrased:
        for i in range(300):
            paraphrased[split] |= {(e.kind, e.template) for e in make_example(0, split, i, paraphrases=True).evidence}
    extra = {("rule", t) for t in PARAPHRASE_RULE_TEMPLATES} | {("document", t) for t in PARAPHRASE_DOC_TEMPLATES}
    held_out = {("rule", t) for t in TEST_RULE_TEMPLATES} | {("document", t) for t in TEST_DOC_TEMPLATES}
    for split, seen in paraphrased.items():
        assert extra <= seen and not seen & held_out, split
    assert all(make_example(0, "test", i, paraphrases=True) == make_example(0, "test", i) for i in range(50))
    # the held-out phrasings stay unseen: no training template shares their distinctive words
    training = [RULE_TEMPLATES[t] for t in range(TEST_RULE_TEMPLATES.start)]
    training += [DOC_TEMPLATES[t] for t in range(TEST_DOC_TEMPLATES.start)]
    for words in ("higher than", "requires the decision", "a lower one", "xceeded", "Recorded", "= {v1};"):
        assert not any(words in t for t in training), words


@pytest.mark.parametrize("paraphrases", [False, True])
def test_encoding_puts_each_evidence_block_in_its_own_candidate_block(tok, paraphrases):
    exs = [make_example(0, "test", i) for i in range(20)]
    exs += [make_example(0, "train", i, paraphrases=paraphrases) for i in range(40)]
    for ex in exs:
        enc = encode(ex, tok)
        table = enc.table
        assert table.blocks[0].kind == "sink" and table.blocks[-1].kind == "response"
        assert [b.label for b in table.blocks if b.candidate] == [e.label for e in ex.evidence]
        target = table.blocks[enc.target_block]
        assert target.label == ex.target
        assert tok.decode(table.token_ids[target.start:target.end]) == ex.target_block.text + "\n"
        assert tok.decode(enc.answer_ids, skip_special_tokens=True) == ex.answer
        assert enc.answer_ids[-1] == tok.eos_token_id
        digit = ex.answer.index(f" [{ex.target}]:") + 3  # the lookup token holds the cited id's first digit
        assert len(tok.decode(enc.answer_ids[: enc.lookup])) <= digit < len(tok.decode(enc.answer_ids[: enc.lookup + 1]))
        assert len(enc.block_ids) == len(enc.input_ids)
        assert enc.copies[0][0] == enc.lookup  # read off the target block: the id's tokens, then the result's
        result = []
        for k, src in enc.copies:
            assert target.start <= src < target.end and table.token_ids[src] == enc.answer_ids[k]
            cited = tok.decode(enc.answer_ids[: k + 1])
            if "]: " in cited:
                result.append(enc.answer_ids[k])
            else:  # an id token: copied from the block's heading ("… <case> [R1" ends both)
                assert tok.decode(table.token_ids[target.start : src + 1]).endswith(cited.removeprefix("Case:"))
        assert tok.decode(result).strip() == ex.answer.split("]: ")[1]
        rendered = tok.apply_chat_template(ex.messages(), tokenize=False, add_generation_prompt=True)
        assert tok.decode(table.token_ids) == rendered
