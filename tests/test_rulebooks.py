"""Rulebooks in real language: ground truth, balance, held-out wording, the
answer format and its parser, rendering for the server and for training, the hand-written set."""
from collections import Counter

import pytest

from localist.model.rulebooks import (
    CLASSES, DOMAIN_SPLITS, DOMAINS, NO_RULE, QUESTIONS_PER_BOOK, SPLITS, SYSTEM, examples, format_answer,
    handwritten, make_example, parse_answer,
)
from localist.model.rulebooks import phrasing as P
from localist.model.rulebooks.generator import FlagIs, Threshold
from localist.model.rulebooks.render import QUESTION_LABEL, block_table, chat_request, encode, rule_line, user_content

COUNT = 400  # examples per split in the checks below: 100 rulebooks
BALANCE_TOLERANCE = 0.02  # each outcome class's share of the answers, against an even share


@pytest.fixture(scope="module")
def generated():
    return {split: list(examples(0, split, COUNT)) for split in SPLITS}


@pytest.fixture(scope="module")
def cases():
    return handwritten.load()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained("models/localist-tiny")


def outcome_class(ex) -> str:
    return "none" if ex.outcome == NO_RULE else CLASSES[ex.outcomes.index(ex.outcome)]


# ------------------------------------------------------------------ generation and ground truth


def test_generation_is_a_pure_function_of_seed_split_index(generated):
    assert make_example(0, "train", 6) == generated["train"][6]
    assert list(examples(0, "train", 5, start=3)) == generated["train"][3:8]
    assert make_example(1, "train", 6) != generated["train"][6]
    assert make_example(0, "validation", 6) != generated["train"][6]


def test_each_split_uses_only_its_own_domains(generated):
    for split in SPLITS:
        domains = {ex.domain for ex in generated[split]}
        allowed = set(DOMAIN_SPLITS[split]) | (set(DOMAIN_SPLITS["train"]) if split == "validation" else set())
        assert domains <= allowed
        assert set(DOMAIN_SPLITS[split]) <= domains
    assert len(DOMAINS) >= 10
    assert not set(DOMAIN_SPLITS["test"]) & (set(DOMAIN_SPLITS["train"]) | set(DOMAIN_SPLITS["validation"]))


def test_outcome_classes_are_balanced(generated):
    """Each rulebook gets one question per class and one no-rule question: exact up to truncation."""
    for split in SPLITS:
        counts = Counter(outcome_class(ex) for ex in generated[split])
        assert set(counts) == {*CLASSES, "none"}
        for cls in counts:
            assert abs(counts[cls] / COUNT - 1 / (len(CLASSES) + 1)) <= BALANCE_TOLERANCE, (split, counts)


def test_outcome_words_mean_one_class_in_every_domain():
    meaning: dict[str, int] = {}
    for domain in DOMAINS.values():
        assert len(domain.outcomes) == len(CLASSES) == len(domain.clauses)
        for cls, word in enumerate(domain.outcomes):
            assert meaning.setdefault(word, cls) == cls, word


def _holds(condition, case) -> bool:
    if isinstance(condition, Threshold):
        value = case.values[condition.quantity]
        assert value != condition.value  # never on the boundary, where prose is ambiguous
        return value > condition.value if condition.greater else value < condition.value
    return case.flags[condition.flag] is condition.value


def _outcome(rule, case) -> int | None:
    """The rule's logic, evaluated here independently of the generator's own ``Rule.decide``."""
    if rule.scope not in (None, case.kind) or not all(_holds(c, case) for c in rule.conditions):
        return None
    exc = rule.exception
    if exc is not None and case.flags[exc.flag] is exc.value:
        return exc.alt
    return rule.outcome


@pytest.mark.parametrize("split", SPLITS)
def test_the_answer_follows_from_the_target_rule_alone(generated, split):
    for ex in generated[split]:
        labels = [r.label for r in ex.rules]
        assert len(set(labels)) == len(labels) >= 4
        assert [r.label for r in ex.logic] == labels
        applied = {r.label: o for r in ex.logic if (o := _outcome(r, ex.case)) is not None}
        if ex.target is None:
            assert applied == {} and ex.outcome == NO_RULE
        else:
            assert ex.target in labels
            assert applied == {ex.target: ex.outcomes.index(ex.outcome)}


@pytest.mark.parametrize("split", SPLITS)
def test_rule_and_question_texts_state_the_logic_and_the_facts(generated, split):
    for ex in generated[split]:
        domain = DOMAINS[ex.domain]
        for rule in ex.logic:
            who = f"the {domain.subject}"
            scope = domain.everything if rule.scope is None else domain.kinds[rule.scope][1]
            assert scope in rule.text or P.capitalise(scope) in rule.text
            assert any(c in rule.text or P.capitalise(c) in rule.text for c in domain.clauses[rule.outcome])
            for c in rule.conditions:
                if isinstance(c, Threshold):
                    q = next(q for q in domain.quantities if q.key == c.quantity)
                    assert q.noun.format(who=who) in rule.text and f"{c.value:,}" in rule.text
                else:
                    flag = next(f for f in domain.flags if f.key == c.flag)
                    assert (flag.yes if c.value else flag.no).format(who=who) in rule.text
        case = ex.case
        assert domain.kinds[case.kind][0] in ex.question and case.name in ex.question
        for key, value in case.values.items():
            assert f"{value:,}" in ex.question, key
        for key, value in case.flags.items():
            flag = next(f for f in domain.flags if f.key == key)
            clause = (flag.yes if value else flag.no).format(who=case.name)
            assert clause in ex.question or P.capitalise(clause) in ex.question


def test_distractors_share_the_targets_words(generated):
    """Nearly every target has a rule beside it on the same kind of case or testing the same fact."""
    def tested(rule):
        keys = {c.quantity if isinstance(c, Threshold) else c.flag for c in rule.conditions}
        return keys | ({rule.exception.flag} if rule.exception else set())

    with_target = [ex for split in SPLITS for ex in generated[split] if ex.target is not None]
    shared = 0
    for ex in with_target:
        target = next(r for r in ex.logic if r.label == ex.target)
        shared += any(r is not target and (r.scope in (None, target.scope) or tested(r) & tested(target))
                      for r in ex.logic)
    assert shared / len(with_target) >= 0.95


def test_rulebooks_have_numbers_negations_and_exceptions(generated):
    rules = [r for split in SPLITS for ex in generated[split][::QUESTIONS_PER_BOOK] for r in ex.logic]
    tested_kinds = {next(q.kind for d in DOMAINS.values() for q in d.quantities if q.key == c.quantity)
                    for r in rules for c in r.conditions if isinstance(c, Threshold)}
    assert {"money", "age", "duration"} <= tested_kinds
    assert any(isinstance(c, FlagIs) and not c.value for r in rules for c in r.conditions)
    text = " ".join(r.text for r in rules)
    assert " not " in text and "unless" in text
    assert sum(r.exception is not None and r.exception.alt is None for r in rules) > 20
    assert sum(r.exception is not None and r.exception.alt is not None for r in rules) > 20


# ------------------------------------------------------------------ held-out wording


def _example_text(ex) -> str:
    return user_content(ex) + "\n" + ex.answer


def test_no_training_example_shares_an_8gram_with_a_test_template(generated):
    test_grams = P.template_ngrams(P.templates("test"))
    assert len(test_grams) >= 10
    # the held-out templates' 8-grams are what test examples are written with: the check has teeth
    assert test_grams & set().union(*(P.word_ngrams(_example_text(ex)) for ex in generated["test"]))
    for split in ("train", "validation"):
        for ex in generated[split]:
            assert not P.word_ngrams(SYSTEM + "\n" + _example_text(ex)) & test_grams, ex.id


def test_training_and_test_rules_and_questions_share_no_8gram(generated):
    """Stronger than the templates: the filled-in rules and questions themselves never overlap."""
    def grams(exs):
        return set().union(*(P.word_ngrams(t) for ex in exs for t in (ex.question, *(r.text for r in ex.rules))))

    overlap = grams(generated["train"] + generated["validation"]) & grams(generated["test"])
    assert not overlap, sorted(overlap)[:5]


def test_train_and_test_phrasings_are_disjoint():
    for texts in (P.RULE_FRAMES, P.QUESTION_FRAMES):
        assert not set(texts["train"]) & set(texts["test"])
    assert not P.template_ngrams(P.templates("train")) & P.template_ngrams(P.templates("test"))


# ------------------------------------------------------------------ answer format and parser


@pytest.mark.parametrize("outcome, label", [("refer", "KYC-2"), ("approve", "R3"), ("deny", "HR-4.1"),
                                            ("clear", "G.4"), (NO_RULE, None)])
def test_parser_reads_the_format_back(outcome, label):
    answer = format_answer(outcome, label)
    assert parse_answer(answer) == (outcome, label)
    assert parse_answer(answer + " The rule's threshold is exceeded, so this follows.") == (outcome, label)
    assert parse_answer("  " + answer.upper() + "\n\nExplanation: …") == (outcome, label and label.upper())


@pytest.mark.parametrize("text, parsed", [
    ("Outcome: refer. Rule: [KYC-2].", ("refer", "KYC-2")),
    ("Outcome:decline.Rule:LEND-7", ("decline", "LEND-7")),
    ("Outcome: no rule applies. Rule: R2.", (NO_RULE, None)),  # a no-rule answer names no rule
    ("Rule: R2. Outcome: no rule applies.", (NO_RULE, None)),
    ("Outcome: refer.", ("refer", None)),
    ("Rule: none. Outcome: refer.", ("refer", None)),  # "none" is no label
    ("Outcome: needs approval. Rule: P-3.", ("needs approval", "P-3")),
    ("", (None, None)),
    ("Rule: R2.", (None, None)),  # no outcome, no answer
    ("The outcome is refer under R2.", (None, None)),
    ("Outcome refer, Rule R2", (None, None)),
    ("Rule: R2. Outcome: refer. Rule: R3.", ("refer", "R2")),  # the first label counts
])
def test_parser_on_malformed_and_variant_answers(text, parsed):
    assert parse_answer(text) == parsed


def test_format_rejects_inconsistent_answers():
    with pytest.raises(ValueError):
        format_answer(NO_RULE, "R1")
    with pytest.raises(ValueError):
        format_answer("refer", None)
    with pytest.raises(ValueError):
        format_answer("refer", "none")


def test_the_answer_names_the_rule_before_its_outcome():
    assert format_answer("refer", "KYC-2") == "Rule: KYC-2. Outcome: refer."
    assert format_answer(NO_RULE, None) == "Rule: none. Outcome: no rule applies."


# ------------------------------------------------------------------ rendering


def test_chat_request_spans_mark_each_rule_and_the_question(generated, cases):
    from localist.clients.contract import BlockSpec

    for ex in generated["test"][:8] + cases[:4]:
        messages, blocks = chat_request(ex)
        assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == SYSTEM
        content = messages[1]["content"]
        for b, rule in zip(blocks, ex.rules):
            assert b["kind"] == "rule" and b["label"] == rule.label and b["message"] == 1
            assert content[b["start"]:b["end"]] == rule_line(rule.label, rule.text) + "\n"
        q = blocks[-1]
        assert (q["label"], q["kind"], content[q["start"]:q["end"]]) == (QUESTION_LABEL, "question", ex.question)
        assert len(blocks) == len(ex.rules) + 1
        for b in blocks:
            BlockSpec(**b)  # the server's request model takes them as they are


def test_block_table_and_encoding_for_training(generated, cases, tok):
    for ex in generated["train"][:8] + cases[:4]:
        table = block_table(ex, tok)
        rules = [b for b in table.blocks if b.kind == "rule"]
        assert [b.label for b in rules] == [r.label for r in ex.rules] and all(b.candidate for b in rules)
        question = table.blocks[table.index(QUESTION_LABEL)]
        assert not question.candidate
        assert tok.decode(table.token_ids[question.start:question.end]) == ex.question
        enc = encode(ex, tok)
        assert enc.table.token_ids == table.token_ids
        assert tok.decode(enc.answer_ids, skip_special_tokens=True) == ex.answer
        assert enc.answer_ids[-1] == tok.eos_token_id
        if ex.target is None:
            assert (enc.target_block, enc.lookup) == (-1, -1)
        else:
            assert table.blocks[enc.target_block].label == ex.target
            first = tok.decode(enc.answer_ids[enc.lookup:enc.lookup + 1])
            assert ex.target[0] in first
            block = table.blocks[enc.target_block]
            for k, source in enc.copies:
                assert block.start <= source < block.end and table.token_ids[source] == enc.answer_ids[k]
            # the tokens that need the rule: the answer up to the end of the label, and the outcome's first
            *upto_label, outcome = enc.pointing
            assert upto_label == list(range(len(upto_label)))
            assert tok.decode(enc.answer_ids[: len(upto_label)]) == f"Rule: {ex.target}"
            first_of_outcome = tok.decode(enc.answer_ids[outcome])
            assert first_of_outcome.startswith(" ") and ex.outcome.startswith(first_of_outcome.strip())


# ------------------------------------------------------------------ hand-written cases


def test_handwritten_cases_cover_classes_and_domains(cases):
    assert len(cases) >= 60
    assert len({ex.id for ex in cases}) == len(cases)
    counts = Counter(outcome_class(ex) for ex in cases)
    assert set(counts) == {*CLASSES, "none"} and min(counts.values()) >= 12, counts
    domains = {ex.domain for ex in cases}
    assert len(domains) >= 20 and len(domains - set(DOMAINS)) >= 10 and len(domains & set(DOMAINS)) >= 8
    for ex in cases:
        labels = [r.label for r in ex.rules]
        assert len(set(labels)) == len(labels) >= 3
        assert parse_answer(ex.answer) == (ex.outcome, ex.target)


def test_handwritten_text_shares_no_8gram_with_the_generator(cases, generated):
    generator_grams = P.template_ngrams([SYSTEM, *P.templates("train"), *P.templates("validation"),
                                         *P.templates("test")])
    generated_grams = set().union(*(P.word_ngrams(t) for split in SPLITS for ex in generated[split]
                                    for t in (ex.question, *(r.text for r in ex.rules))))
    for ex in cases:
        text = "\n".join([ex.title, ex.question, *(r.text for r in ex.rules)])
        assert not P.word_ngrams(text) & generator_grams, ex.id
        assert not P.word_ngrams(text) & generated_grams, ex.id
