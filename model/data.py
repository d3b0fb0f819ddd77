"""Synthetic regulated-domain task data for the default localist model.

Every example is a small rulebook (numbered rules on lending, KYC, claims or dosage) or a set of
case files, plus one question whose answer depends on exactly one of them: the **target** block,
ground truth for pointer fidelity. Entities are unique within an example and every value (ids,
thresholds, outcomes, file contents) is drawn afresh, so nothing can be memorised: the model has to
find the block the question is about and read it. The test split uses rule and file templates that
training never sees.

Generation is a pure function of (seed, split, index), so any example can be regenerated alone.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from localist.model.blocks import BlockTable, Span, table_from_chat
from localist.model.recruitment import apply_layout

SPLITS = ("train", "validation", "test")

SYSTEM = (
    "You are a compliance assistant. Name the case, use exactly one rule or document, cite its id, "
    "then give the decision or the value."
)

# name, (quantity, unit), entities, outcomes above the limit, outcomes at or below it. No two
# entities end in the same word: the answer cites a rule right after naming its entity, so the word
# before the id is what tells the blocks apart (see ``solve``).
DOMAINS = {
    "lending": ("Lending", ("loan amount", "thousand EUR"),
                ["mortgage", "overdraft", "microloan", "credit line", "student loan", "car lease",
                 "bridge financing", "bank guarantee", "invoice factoring", "instalment plan"],
                ["escalate", "reject", "refer"], ["approve", "accept"]),
    "kyc": ("KYC", ("value", "thousand EUR"),
            ["cash deposit", "wire transfer", "crypto purchase", "foreign payment", "new account",
             "securities trade", "cheque", "gift card"],
            ["report", "verify", "freeze", "escalate"], ["clear", "accept"]),
    "claims": ("Claims", ("reporting delay", "days"),
               ["flood damage", "theft", "house fire", "storm", "broken windscreen", "trip cancellation",
                "public liability", "dental treatment"],
               ["deny", "investigate", "refer"], ["pay", "approve"]),
    "dosage": ("Dosage", ("daily dose", "mg per kg"),
               ["amoxicillin", "ibuprofen", "paracetamol", "metformin", "warfarin", "lisinopril",
                "omeprazole", "sertraline", "codeine", "prednisone"],
               ["refer", "reduce", "reject"], ["dispense", "approve"]),
}

# Rule templates: all but the last two are for training and validation; the last two appear only in
# test. Every rule opens with its heading "Rule on <entity> [<id>]": the id follows the entity as it
# does in the answer, so citing it is a copy of what follows the entity (an induction head), not a
# search back from the entity to an id written before it. Every template names the outcome above the
# limit before the one at or below it. Training has many phrasings so that what the model learns is
# to read a rule, not the positions of one sentence frame (with four, the held-out outcome was read
# at chance).
RULE_TEMPLATES = [
    "Rule on {entity} [{id}]. {area}: if the {qty} exceeds {thr} {unit}, the decision is {above}; "
    "otherwise it is {below}.",
    "Rule on {entity} [{id}] with a {qty} above {thr} {unit}: {above}. At or below {thr} {unit}: {below}.",
    "Rule on {entity} [{id}] cases: a {qty} over {thr} {unit} means {above}, and {below} in all other cases.",
    "Rule on {entity} [{id}]: maximum {qty} {thr} {unit}. Above it: {above}. Otherwise: {below}.",
    "Rule on {entity} [{id}]: when the {qty} is greater than {thr} {unit}, {above}; else {below}.",
    "Rule on {entity} [{id}]. Threshold {thr} {unit} ({qty}). Over the threshold: {above}. Up to it: {below}.",
    "Rule on {entity} [{id}] ({area}): a {qty} beyond {thr} {unit} leads to {above}, anything up to "
    "{thr} {unit} to {below}.",
    "Rule on {entity} [{id}]: {area} cap of {thr} {unit} on the {qty}. Higher: {above}. Lower or equal: {below}.",
    "Rule on {entity} [{id}]. If {qty} > {thr} {unit} then {above}, if not then {below}.",
    "Rule on {entity} [{id}]: the {qty} limit is {thr} {unit}; cases past it get {above}, the rest {below}.",
    "Rule on {entity} [{id}]. Any {qty} in excess of {thr} {unit} calls for {above}; a smaller one for {below}.",
    "Rule on {entity} [{id}]: exceeding {thr} {unit} of {qty} means {above}. Staying within means {below}.",
    # paraphrases: training templates too, used only when a run asks for them (``paraphrases=True``)
    "Rule on {entity} [{id}]: where the {qty} is more than {thr} {unit}, {above}; in other cases, {below}.",
    "Rule on {entity} [{id}]. For a {qty} of more than {thr} {unit} the outcome is {above}, else it is {below}.",
    "Rule on {entity} [{id}] ({area}). Ceiling: {thr} {unit} of {qty}. Past the ceiling: {above}. Within it: {below}.",
    "Rule on {entity} [{id}]: {qty} greater than {thr} {unit} gives {above}; {qty} up to {thr} {unit} gives {below}.",
    "Rule on {entity} [{id}]. Should the {qty} pass {thr} {unit}, {above}. If it does not, {below}.",
    "Rule on {entity} [{id}], {area} policy: over {thr} {unit} ({qty}) means {above}; not over means {below}.",
    "Rule on {entity} [{id}]: a {qty} that tops {thr} {unit} triggers {above}, one that does not triggers {below}.",
    "Rule on {entity} [{id}]. The {qty} may not exceed {thr} {unit}. Breach: {above}. No breach: {below}.",
    "Rule on {entity} [{id}]: {above} once the {qty} goes beyond {thr} {unit}, and {below} until then.",
    "Rule on {entity} [{id}] sets {thr} {unit} as the {qty} bound; above the bound {above}, below or at it {below}.",
    "Rule on {entity} [{id}]. Case {qty} above {thr} {unit}? Then {above}. Otherwise {below}.",
    "Rule on {entity} [{id}]: the {area} desk decides {above} for a {qty} past {thr} {unit} and {below} for the rest.",
    "Rule on {entity} [{id}]. Upper bound {thr} {unit} for the {qty}; beyond it {above}, inside it {below}.",
    "Rule on {entity} [{id}]: more than {thr} {unit} of {qty} leads to {above}. Anything less leads to {below}.",
    # held out
    "Rule on {entity} [{id}]. A {qty} higher than {thr} {unit} requires the decision {above}; a lower one "
    "gets {below}.",
    "Rule on {entity} [{id}]: {area} limit {thr} {unit} of {qty}. Exceeded: {above}. Not exceeded: {below}.",
]
QUESTION_TEMPLATES = [
    "Case: a {entity} with a {qty} of {val} {unit}. Which rule applies, and what is the decision?",
    "A new {entity} case arrives; its {qty} is {val} {unit}. Cite the rule and decide.",
    "Decide this case and name the rule: {entity}, {qty} {val} {unit}.",
]

FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Karin",
         "Luca", "Maria", "Nils", "Olga", "Pavel", "Rosa", "Sami", "Tara", "Viktor", "Wen", "Yusuf"]
LAST = ["Berg", "Costa", "Dahl", "Engel", "Fischer", "Garcia", "Hansen", "Ivanova", "Jensen", "Klein",
        "Lopez", "Meyer", "Novak", "Olsen", "Petrov", "Rossi", "Schmidt", "Tanaka", "Weber", "Zimmer"]
FIELDS = ["credit score", "age", "risk score", "income band", "account age", "open loans",
          "years employed", "claims filed"]
DOC_TEMPLATES = [
    "File of {name} [{id}]. {F1}: {v1}. {F2}: {v2}. {F3}: {v3}.",
    "File of {name} [{id}], record: {f1} {v1}, {f2} {v2}, {f3} {v3}.",
    "File of {name} [{id}], case document: the {f1} is {v1}, the {f2} is {v2} and the {f3} is {v3}.",
    "File of {name} [{id}] lists {f1} {v1}; {f2} {v2}; {f3} {v3}.",
    "File of {name} [{id}]. {F1} {v1}. {F2} {v2}. {F3} {v3}.",
    "File of {name} [{id}], summary: {f1} of {v1}, {f2} of {v2}, {f3} of {v3}.",
    "File of {name} [{id}] with {f1} {v1}, with {f2} {v2} and with {f3} {v3}.",
    "File of {name} [{id}]: {f1} = {v1}, {f2} = {v2}, {f3} = {v3}.",
    "File of {name} [{id}]. Values on record: {f1} at {v1}, {f2} at {v2}, {f3} at {v3}.",
    # paraphrases
    "File of {name} [{id}], profile: {f1} {v1} / {f2} {v2} / {f3} {v3}.",
    "File of {name} [{id}]. The {f1} reads {v1}, the {f2} reads {v2}, the {f3} reads {v3}.",
    "File of {name} [{id}]: {F1} - {v1}. {F2} - {v2}. {F3} - {v3}.",
    "File of {name} [{id}] shows a {f1} of {v1}, a {f2} of {v2} and a {f3} of {v3}.",
    "File of {name} [{id}]. Entries: {f1}, {v1}; {f2}, {v2}; {f3}, {v3}.",
    "File of {name} [{id}]: known {f1} {v1}, known {f2} {v2}, known {f3} {v3}.",
    "File of {name} [{id}]. {F1} is {v1}. {F2} is {v2}. {F3} is {v3}.",
    # held out
    "File of {name} [{id}]. Recorded {f1} = {v1}; {f2} = {v2}; {f3} = {v3}.",
]
DOC_QUESTIONS = [
    "What is the {field} of {name}? Cite the document.",
    "Look up {name}: what {field} is on file?",
    "Give the {field} recorded for {name}, with the document id.",
]
TRAIN_RULE_TEMPLATES, PARAPHRASE_RULE_TEMPLATES, TEST_RULE_TEMPLATES = range(0, 12), range(12, 26), range(26, 28)
TRAIN_DOC_TEMPLATES, PARAPHRASE_DOC_TEMPLATES, TEST_DOC_TEMPLATES = range(0, 9), range(9, 16), range(16, 17)


@dataclass(frozen=True)
class Evidence:
    """One rule or document: its anchor label, kind, rendering template and structured content."""

    label: str
    kind: str  # "rule" | "document"
    template: int
    fields: dict = field(hash=False)

    @property
    def text(self) -> str:
        f = self.fields
        if self.kind == "rule":
            area, (qty, unit) = DOMAINS[f["domain"]][0], DOMAINS[f["domain"]][1]
            return RULE_TEMPLATES[self.template].format(
                id=self.label, area=area, entity=f["entity"],
                qty=qty, unit=unit, thr=f["thr"], above=f["above"], below=f["below"],
            )
        names = f["fields"]
        return DOC_TEMPLATES[self.template].format(
            id=self.label, name=f["name"], **{f"f{i + 1}": n for i, n in enumerate(names)},
            **{f"F{i + 1}": n[0].upper() + n[1:] for i, n in enumerate(names)},
            **{f"v{i + 1}": f["values"][n] for i, n in enumerate(names)},
        )


@dataclass(frozen=True)
class Case:
    """What the question asks: which entity (rules) or person (documents), with the case value."""

    family: str  # "rule" | "document"
    key: str  # the entity or the person's name: it identifies the target block
    value: int | None = None  # the case's quantity (rules)
    field: str | None = None  # the asked field (documents)


@dataclass(frozen=True)
class Example:
    split: str
    index: int
    evidence: tuple[Evidence, ...]
    case: Case
    question: str
    target: str  # label of the block the answer must come from

    @property
    def answer(self) -> str:
        return solve(self.target_block, self.case)

    @property
    def target_block(self) -> Evidence:
        return next(e for e in self.evidence if e.label == self.target)

    def messages(self) -> list[dict[str, str]]:
        """Chat messages: the instruction, then one user turn holding the evidence and the question."""
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.user_content()}]

    def user_content(self) -> str:
        return "".join(e.text + "\n" for e in self.evidence) + self.question

    def spans(self) -> list[Span]:
        """Character spans of the evidence blocks inside the user message (newline included)."""
        spans, pos = [], 0
        for e in self.evidence:
            end = pos + len(e.text) + 1
            spans.append(Span(pos, end, e.label, e.kind))
            pos = end
        return spans


def block_matches(block: Evidence, case: Case) -> bool:
    """Whether a block is about the case's entity or person (exactly one block per example is)."""
    key = block.fields["entity"] if block.kind == "rule" else block.fields["name"]
    return block.kind == case.family and key == case.key


def solve(block: Evidence, case: Case) -> str:
    """The correct answer from the target block alone: ``Case: <case> [<id>]: <decision or value>``.

    The answer names the case (copied from the question) and then cites the id exactly as the block's
    heading does (``<entity> [<id>]``), so the query that writes the id sits right after the entity's
    last word, which no other block shares: finding the block is one content match on that word."""
    if not block_matches(block, case):
        raise ValueError(f"block {block.label} is not about {case.key!r}")
    f = block.fields
    result = (f["above"] if case.value > f["thr"] else f["below"]) if case.family == "rule" else f["values"][case.field]
    return f"Case: {case.key}{citation(block.label)} {result}"


def citation(label: str) -> str:
    """How an answer cites a block (`` [R12]:``), between the case and the result."""
    return f" [{label}]:"


def _templates(split: str, family: str, paraphrases: bool) -> Sequence[int]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        return TEST_RULE_TEMPLATES if family == "rule" else TEST_DOC_TEMPLATES
    base, extra = ((TRAIN_RULE_TEMPLATES, PARAPHRASE_RULE_TEMPLATES) if family == "rule"
                   else (TRAIN_DOC_TEMPLATES, PARAPHRASE_DOC_TEMPLATES))
    return [*base, *extra] if paraphrases else base


def make_example(seed: int, split: str, index: int, min_blocks: int = 3, max_blocks: int = 8,
                 paraphrases: bool = False) -> Example:
    """Example ``index`` of ``split``: a pure function of its arguments. ``paraphrases`` widens the
    training and validation phrasings (a later training stage); the test split is unaffected."""
    if not 2 <= min_blocks <= max_blocks:
        raise ValueError(f"need 2 <= min_blocks <= max_blocks, got {min_blocks}, {max_blocks}")
    rng = random.Random(f"localist-data:{seed}:{split}:{index}")
    n = rng.randint(min_blocks, max_blocks)
    family = "rule" if rng.random() < 0.7 else "document"
    templates = _templates(split, family, paraphrases)
    ids = rng.sample(range(1, 100), n)
    if family == "rule":
        domains = rng.sample(sorted(DOMAINS), rng.randint(1, 2))
        pool = [(d, e) for d in domains for e in DOMAINS[d][2]]
        chosen = rng.sample(pool, min(n, len(pool)))
        evidence = []
        for i, (domain, entity) in zip(ids, chosen):
            _, _, _, above, below = DOMAINS[domain]
            fields = {"domain": domain, "entity": entity, "thr": rng.randint(15, 90),
                      "above": rng.choice(above), "below": rng.choice(below)}
            evidence.append(Evidence(f"R{i}", "rule", rng.choice(templates), fields))
        target = rng.choice(evidence)
        thr = target.fields["thr"]
        value = rng.choice([v for v in range(10, 100) if v != thr])
        case = Case("rule", target.fields["entity"], value=value)
        qty, unit = DOMAINS[target.fields["domain"]][1]
        question = rng.choice(QUESTION_TEMPLATES).format(entity=case.key, qty=qty, val=value, unit=unit)
    else:
        names = [f"{rng.choice(FIRST)} {last}" for last in rng.sample(LAST, n)]  # surnames tell them apart
        fields_asked = rng.sample(FIELDS, 3)
        evidence = [
            Evidence(f"D{i}", "document", rng.choice(templates),
                     {"name": name, "fields": fields_asked, "values": {f: rng.randint(10, 99) for f in fields_asked}})
            for i, name in zip(ids, names)
        ]
        target = rng.choice(evidence)
        case = Case("document", target.fields["name"], field=rng.choice(fields_asked))
        question = rng.choice(DOC_QUESTIONS).format(field=case.field, name=case.key)
    return Example(split, index, tuple(evidence), case, question, target.label)


def examples(seed: int, split: str, count: int, start: int = 0, **kwargs) -> Iterator[Example]:
    for index in range(start, start + count):
        yield make_example(seed, split, index, **kwargs)


def corpus_texts(seed: int, count: int) -> list[str]:
    """Rendered chats of training examples, with answers, for training the tokenizer."""
    texts = []
    for ex in examples(seed, "train", count):
        texts.append(f"{SYSTEM}\n{ex.user_content()}\n{ex.answer}")
    return texts


@dataclass
class Encoded:
    """One tokenised example: prompt blocks, answer tokens and the ground-truth target block."""

    table: BlockTable  # the prompt's blocks (response block = the generation prompt)
    answer_ids: list[int]  # answer tokens, EOS included
    target_block: int
    lookup: int = -1  # answer token holding the cited id's first digit: the one that needs the lookup
    copies: list[tuple[int, int]] = field(default_factory=list)  # (answer token, its source in the prompt)
    pointing: list[int] = field(default_factory=list)  # answer tokens whose prediction must find the target block

    @property
    def input_ids(self) -> list[int]:
        return self.table.token_ids + self.answer_ids

    @property
    def block_ids(self) -> list[int]:
        return self.table.block_ids() + [self.table.response_id] * len(self.answer_ids)


def encode(example: Example, tokenizer, split_kinds: Sequence[str] = ()) -> Encoded:
    """Blocks via the product's chat builder (so training sees what serving builds), plus the answer.

    ``split_kinds`` is the layout recruited in training (docs/theory.md §6): blocks of those kinds are split
    at their sentence ends.
    """
    table = table_from_chat(tokenizer, example.messages(), spans={1: example.spans()})
    if split_kinds:
        table = apply_layout(table, tokenizer, split_kinds)[0]
    enc = tokenizer(example.answer, add_special_tokens=False, return_offsets_mapping=True)
    digit = example.answer.index(citation(example.target)) + 3  # "Case: <case> [R12]: …" → the "1"
    lookup = next(k for k, (a, b) in enumerate(enc["offset_mapping"]) if a <= digit < b)
    target = table.index(example.target)
    copies = copy_sources(example, table, target, digit, enc["input_ids"], enc["offset_mapping"])
    return Encoded(table, list(enc["input_ids"]) + [tokenizer.eos_token_id], target, lookup, copies)


def copy_sources(example: Example, table: BlockTable, target: int, digit: int, answer_ids, offsets
                 ) -> list[tuple[int, int]]:
    """(answer token, prompt position) pairs for the answer tokens that are read off the target block.

    The cited id's tokens come from the block's heading (each one's first occurrence after the
    previous id token's: "88" as two "8" tokens reads two positions) and the outcome or value from
    its body (their last occurrence: a value equal to the id's digits is still the field's).
    ``digit`` is the answer's offset of the id's first digit. They are the attention targets of the
    token-level readout term in training.
    """
    result = example.answer.index("]: ") + 3
    block = table.blocks[target]
    body = table.token_ids[block.start:block.end]
    pairs, after = [], -1  # after: the heading position of the previous id token
    for k, ((a, b), token) in enumerate(zip(offsets, answer_ids)):
        hits = [j for j, t in enumerate(body) if t == token]
        if a < digit + len(example.target) - 1 and b > digit:  # an id token
            source = next((j for j in hits if j > after), None)
            after = after if source is None else source
        else:
            source = hits[-1] if hits and b > result else None
        if source is not None:
            pairs.append((k, block.start + source))
    return pairs
