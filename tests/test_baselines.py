"""The depth-pruning baselines (shortgpt, angular, laco, sleb, shortened-ppl/-taylor, last-n) on
tiny random models: each reaches the requested size and saves a folder plain transformers
reloads; crafted cases check that each criterion picks what it should; the incremental
SLEB and LaCo engines take the decisions of naive full-forward loops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from layerfold import api
from layerfold.errors import LayerfoldError
from layerfold.methods.base import Target
from layerfold.models.arch import architecture_for, norm_parameter_names
from layerfold.plan import Operation, Plan
from layerfold.similarity import sample_cosine
from layerfold.surgery import apply_plan

VOCAB = 96


def tiny_llama(layers: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_gemma2(layers: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       sliding_window=8, final_logit_softcapping=5.0)
    return Gemma2ForCausalLM(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gemma2": tiny_gemma2}
OPTIONS = {"laco": {"merge_layers": 3}, "shortened-taylor": {"keep_first": 1, "keep_last": 1}}
METHODS = ["shortgpt", "angular", "laco", "sleb", "shortened-ppl", "shortened-taylor", "last-n"]


def tokens(n: int = 4, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def plan(model, method: str, keep: int, toks: torch.Tensor | None = None, **options):
    opts = {**OPTIONS.get(method, {}), **options}
    return api.make_plan(model, method, Target(layers=keep), tokens=tokens() if toks is None else toks,
                         options=opts, progress=False)


def layers_of(model) -> nn.ModuleList:
    return architecture_for(model.config).layer_list(model)


def make_identity(model, i: int, scale: float = 0.0) -> None:
    """Scale layer ``i``'s attention and MLP output projections (Llama): at 0 the layer passes
    its input through unchanged."""
    layer = layers_of(model)[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(scale)
        layer.mlp.down_proj.weight.mul_(scale)


@torch.no_grad()
def greedy_tokens(model, n: int = 4, length: int = 16) -> torch.Tensor:
    """Sharpen the model's predictions (lm head x 5) and return sequences it predicts itself:
    on them, changing the model raises the loss (checked over 8 seeds x 4 identity positions)."""
    model.get_output_embeddings().weight.mul_(5.0)
    seqs = tokens(n, 2)
    while seqs.shape[1] < length:
        nxt = model(input_ids=seqs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_reaches_size_saves_and_reloads(arch, method, tmp_path):
    model = BUILDERS[arch]()
    result = plan(model, method, keep=4)
    assert result.plan.num_layers_after == 4
    report = api.prune(model, tmp_path / "out", plan=result, ppl=(), progress=False)
    assert report.layers_after == 4
    ids = tokens(2, 12, seed=7)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        got = reloaded(input_ids=ids, use_cache=False).logits
    assert len(layers_of(reloaded)) == 4
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert Plan.load(tmp_path / "out" / "plan.json").summary() == result.plan.summary()


def test_every_op_carries_its_score():
    model = tiny_llama()
    for method in ("shortgpt", "angular", "sleb", "shortened-ppl", "shortened-taylor"):
        result = plan(model, method, keep=4)
        assert result.plan.scores, method
        assert all(op.score is not None for op in result.plan.operations), method


def test_shortgpt_removes_an_identity_layer_first():
    model = tiny_llama(layers=6)
    make_identity(model, 3)
    result = plan(model, "shortgpt", keep=5)
    assert [op.lo for op in result.plan.operations] == [3]
    assert result.plan.scores["block_influence"][3] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["sleb", "shortened-ppl", "shortened-taylor"])
def test_loss_criteria_remove_the_layer_whose_removal_leaves_the_loss(method):
    model = tiny_llama(layers=6)
    make_identity(model, 2)
    options = {"keep_first": 0, "keep_last": 0} if method == "shortened-taylor" else {}
    result = plan(model, method, keep=5, toks=greedy_tokens(model), **options)
    assert [op.lo for op in result.plan.operations] == [2]


def test_angular_picks_the_near_identity_block():
    model = tiny_llama(layers=8)
    for i in (4, 5):
        make_identity(model, i, scale=1e-3)
    result = plan(model, "angular", keep=6)
    assert [op.lo for op in result.plan.operations] == [4, 5]
    distances = result.plan.scores["angular_distance"]
    assert min(distances, key=distances.get) == "4"


def test_last_n_keeps_the_final_layer():
    result = plan(tiny_gpt2(layers=6), "last-n", keep=3)
    assert [op.lo for op in result.plan.operations] == [2, 3, 4]
    assert result.plan.kept_sources() == [0, 1, 5]


# --- SLEB and Shortened-PPL against naive full forwards ---------------------------------------


def dropped(model, layers: list[int]):
    pruned = copy.deepcopy(model)
    n = len(layers_of(model))
    apply_plan(pruned, Plan(method="naive", num_layers=n, operations=[Operation("drop", i, i) for i in layers]))
    return pruned


@torch.no_grad()
def full_loss(model, toks: torch.Tensor) -> float:
    return float(model(input_ids=toks, labels=toks, use_cache=False).loss)


def naive_sleb(model, toks: torch.Tensor, steps: int) -> list[int]:
    removed: list[int] = []
    n = len(layers_of(model))
    for _ in range(steps):
        losses = {j: full_loss(dropped(model, removed + [j]), toks) for j in range(n) if j not in removed}
        removed.append(min(losses, key=lambda j: (losses[j], j)))
    return removed


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sleb_matches_naive_full_forward_loop(arch):
    model = BUILDERS[arch](layers=6, seed=3)
    toks = tokens(4, 16, seed=5)
    result = plan(model, "sleb", keep=3, toks=toks)
    assert result.plan.scores["removal_order"] == naive_sleb(model, toks, 3)
    first = result.plan.scores["steps"][0]["perplexity"]
    for j in (0, 5):
        assert first[str(j)] == pytest.approx(torch.tensor(full_loss(dropped(model, [j]), toks)).exp().item(),
                                              rel=1e-4)


def test_shortened_ppl_matches_naive_full_forwards():
    model = tiny_gpt2(layers=6, seed=4)
    toks = tokens(4, 16, seed=6)
    result = plan(model, "shortened-ppl", keep=4, toks=toks)
    naive = [torch.tensor(full_loss(dropped(model, [j]), toks)).exp().item() for j in range(6)]
    assert result.plan.scores["importance"] == pytest.approx(naive, rel=1e-4)
    assert [op.lo for op in result.plan.operations] == sorted(sorted(range(6), key=lambda j: naive[j])[:2])


def test_taylor_matches_a_full_backward():
    model = tiny_llama(layers=6, seed=2)
    toks = tokens(4, 16, seed=8)
    result = plan(model, "shortened-taylor", keep=5, toks=toks, keep_first=0, keep_last=0)
    model.zero_grad()
    model(input_ids=toks, labels=toks, use_cache=False).loss.backward()
    expected = [sum(float((p.detach() * p.grad).abs().sum())
                    for name, p in layer.named_parameters() if name.endswith("weight"))
                for layer in layers_of(model)]
    model.zero_grad()
    assert result.plan.scores["importance"] == pytest.approx(expected, rel=1e-4)


# --- LaCo against the authors' loop, written naively ------------------------------------------


@torch.no_grad()
def final_states(model, toks: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.model(input_ids=row[None], use_cache=False).last_hidden_state for row in toks])


def naive_merge(current, lay: int, count: int, operator: str):
    """The authors' merge_layers_return_model on every non-norm parameter: ``reference`` is their
    in-place loop, ``diff`` the paper's theta_l + sum (theta_k - theta_l)."""
    candidate = copy.deepcopy(current)
    src, dst = layers_of(current), layers_of(candidate)
    norms = norm_parameter_names(dst[lay])
    base0 = {n: p.detach().clone() for n, p in src[lay].named_parameters()}
    with torch.no_grad():
        for d in range(lay + 1, lay + 1 + count):
            other = dict(src[d].named_parameters())
            for name, p in dst[lay].named_parameters():
                if name not in norms:
                    p.add_(other[name] - (p if operator == "reference" else base0[name]))
    kept = [layer for i, layer in enumerate(dst) if not lay < i <= lay + count]
    architecture_for(candidate.config).set_layer_list(candidate, nn.ModuleList(kept))
    return candidate


def naive_laco(model, toks, c: int, interval: int, threshold: float, operator: str):
    reference = final_states(model, toks)
    current = copy.deepcopy(model)
    lay = len(layers_of(model)) - 1 - c
    accepted = 0
    while lay >= 0:
        count = min(c - 1, len(layers_of(current)) - lay - 1)
        candidate = naive_merge(current, lay, count, operator)
        if sample_cosine(final_states(candidate, toks), reference) > threshold:
            current, accepted = candidate, accepted + 1
            lay -= interval
            if lay >= len(layers_of(current)):
                lay = len(layers_of(current)) - 1 - c
        else:
            lay -= 1
    return current, accepted


@pytest.mark.parametrize("operator", ["diff", "reference"])
@pytest.mark.parametrize("threshold", [-1.0, 0.9])
def test_laco_matches_the_authors_loop(operator, threshold):
    model = tiny_llama(layers=8, seed=1)
    toks = tokens(3, 12, seed=2)
    result = api.make_plan(model, "laco", tokens=toks, progress=False,
                           options={"merge_layers": 3, "interval": 1, "threshold": threshold, "merge": operator})
    naive, accepted = naive_laco(model, toks, 3, 1, threshold, operator)
    assert accepted == sum(t["accepted"] for t in result.plan.scores["trials"])
    pruned = api.apply_plan(copy.deepcopy(model), result)
    assert len(layers_of(pruned)) == len(layers_of(naive))
    ids = tokens(2, 10, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, naive(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_laco_nested_diff_merge_travels_with_the_plan(tmp_path):
    model = tiny_llama(layers=8)
    result = api.make_plan(model, "laco", tokens=tokens(), progress=False,
                           options={"merge_layers": 3, "threshold": -1.0})
    nested = [op for op in result.plan.operations if op.detail["nested"]]
    assert nested and set(result.overrides) == {op.lo for op in nested}
    api.save_plan(result, tmp_path / "plan.json")
    again = api.load_plan(tmp_path / "plan.json")
    a = api.apply_plan(copy.deepcopy(model), result)
    b = api.apply_plan(copy.deepcopy(model), again)
    ids = tokens(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_laco_reference_needs_no_stored_weights():
    result = api.make_plan(tiny_llama(layers=8), "laco", tokens=tokens(), progress=False,
                           options={"merge_layers": 3, "threshold": -1.0, "merge": "reference"})
    assert any(op.detail["nested"] for op in result.plan.operations)
    assert result.overrides == {}


def test_laco_target_searches_the_threshold():
    result = plan(tiny_llama(layers=8), "laco", keep=5)
    assert result.plan.num_layers_after == 5
    assert -1.0 <= result.plan.threshold <= 1.0


@pytest.mark.parametrize(("method", "options", "keep", "message"), [
    ("laco", {"merge_layers": 1}, 4, "merge_layers"),
    ("laco", {"threshold": 0.5}, 4, "not both"),
    ("laco", {"merge_layers": 2, "interval": 3, "lowest_lay": 3}, 2, "cannot remove"),
    ("shortened-taylor", {"keep_first": 4, "keep_last": 2}, 4, "keep_first"),
    ("shortgpt", {"threshold": 0.5}, 4, "threshold"),
])
def test_bad_options_are_refused(method, options, keep, message):
    with pytest.raises(LayerfoldError, match=message):
        api.make_plan(tiny_llama(layers=6), method, Target(layers=keep), tokens=tokens(), options=options,
                      progress=False)


@pytest.mark.parametrize("method", ["shortgpt", "angular", "sleb", "shortened-ppl", "shortened-taylor", "last-n"])
def test_size_is_required(method):
    with pytest.raises(LayerfoldError, match="needs a size"):
        api.make_plan(tiny_llama(), method, tokens=tokens(), progress=False)
