"""Reference localist LM on tiny random HF checkpoints (docs/theory.md §2 at the model level)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from localist.model.blocks import Piece, Span, table_from_chat, table_from_texts
from localist.model.reference import ReferenceLM
from localist.model.tiny import make_tiny_checkpoint

RULES = [
    "Rule R1: A loan above 50000 EUR requires a second approval.",
    " Rule R2: Claims filed more than 30 days late are not eligible.",
    " Rule R3: The daily dose must not exceed 4 grams.",
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    # A larger init than HF's default gives peaked attention, so the dial has something to sharpen.
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch=request.param, initializer_range=0.2)


@pytest.fixture(scope="module")
def ref(checkpoint):
    return ReferenceLM.from_pretrained(checkpoint)


def rules_table(tok, question=" Question: which rule applies to a claim?"):
    pieces = [Piece(text, f"R{i + 1}", "rule") for i, text in enumerate(RULES)]
    return table_from_texts(tok, pieces + [Piece(question, "q", "question")])


def chat_table(tok):
    content = "".join(RULES)
    spans = [Span(content.index(r.strip()), content.index(r.strip()) + len(r.strip()), f"R{i}", "rule")
             for i, r in enumerate(RULES)]
    messages = [{"role": "system", "content": content}, {"role": "user", "content": "Which rule?"}]
    return table_from_chat(tok, messages, spans={0: spans})


@pytest.mark.parametrize("build", [rules_table, chat_table])
def test_rho_zero_is_the_hf_model(ref, checkpoint, build):
    table = build(ref.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(torch.tensor([table.token_ids])).logits
    logits, _ = ref.forward([table], [[0.0] * ref.num_layers])
    assert (logits - expected).abs().max().item() <= 1e-5
    sharpened, _ = ref.forward([table], [[0.9] * ref.num_layers])
    assert (sharpened - expected).abs().max().item() > 1e-2  # the dial really acts


def test_batch_with_mixed_dials_and_layouts_equals_solo(ref):
    tok = ref.tokenizer
    tables = [rules_table(tok), chat_table(tok), rules_table(tok, " Question: a dose?")]
    dials = [[0.0] * ref.num_layers, [0.9] * ref.num_layers, [1.0, 0.3][: ref.num_layers]]
    logits, stats = ref.forward(tables, dials)
    for row, (table, rho) in enumerate(zip(tables, dials)):
        solo_logits, solo_stats = ref.forward([table], [rho])
        n = len(table.token_ids)
        # float32 rounding (reductions over a batch-padded block count) is amplified (1 + λ)-fold by
        # the sharpened dial; the tolerances follow it (ρ = 0 rows must agree to the usual 1e-5)
        amp = 1 + max((r / (1 - r) for r in rho if r < 1), default=0.0)
        assert torch.allclose(logits[row, :n], solo_logits[0], atol=1e-5 * amp)
        for layer, s in solo_stats.items():
            G = table.num_blocks
            assert torch.allclose(stats[layer].mass[row, :, :n, :G], s.mass[0], atol=1e-6 * amp)
            assert stats[layer].mass[row, :, :n, G:].abs().sum() == 0  # blocks of other rows get nothing


def test_model_level_dial_properties(ref):
    table = rules_table(ref.tokenizer)
    L = ref.num_layers
    grid = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
    runs = {rho: ref.forward([table], [[rho] * L])[1] for rho in grid}
    # Layer 0 sees the same inputs at every ρ: its block log-masses agree, pinned (sink) mass is
    # unchanged and the top free block's mass never falls as ρ rises.
    base = runs[0.0][0]
    top = base.log_mass[..., 1:].argmax(-1, keepdim=True) + 1
    previous = base.mass.gather(-1, top)
    for rho in grid[1:]:
        s = runs[rho][0]
        assert torch.allclose(s.log_mass, base.log_mass, atol=1e-5)
        assert torch.allclose(s.mass[..., 0], base.mass[..., 0], atol=1e-6)
        current = s.mass.gather(-1, top)
        assert (current >= previous - 1e-6).all()
        previous = current
    # ρ = 1: in every layer and head, all free mass sits on one block.
    for s in runs[1.0].values():
        free = s.mass[..., 1:]
        assert torch.allclose(free.max(-1).values, free.sum(-1), atol=1e-6)


def test_per_layer_dial_leaves_earlier_layers_alone(ref):
    table = rules_table(ref.tokenizer)
    L = ref.num_layers
    _, plain = ref.forward([table], [[0.0] * L])
    _, mixed = ref.forward([table], [[0.0] * (L - 1) + [0.9]])
    for layer in range(L - 1):
        assert torch.allclose(mixed[layer].mass, plain[layer].mass, atol=1e-6)
    assert not torch.allclose(mixed[L - 1].mass, plain[L - 1].mass, atol=1e-3)


def test_generation_stats_match_full_forward(ref):
    """Cached greedy generation reproduces an uncached forward over prompt + generated tokens."""
    table = rules_table(ref.tokenizer)
    rho = [0.75] * ref.num_layers
    tokens, stats = ref.generate(table, rho, max_new_tokens=4, stop_at_eos=False)
    assert stats.mass.shape[:2] == (4, ref.num_layers)
    assert torch.allclose(stats.mass.sum(-1), torch.ones(()), atol=1e-5)
    full = type(table)(table.blocks, table.token_ids + tokens[:-1])
    logits, per_layer = ref.forward([full], [rho])
    n = len(table.token_ids)
    assert logits[0, n - 1:].argmax(-1).tolist() == tokens
    for layer in range(ref.num_layers):
        expected = per_layer[layer].mass[0, :, n - 1:].transpose(0, 1)  # [T, H, G]
        assert torch.allclose(stats.mass[:, layer], expected, atol=1e-5)
