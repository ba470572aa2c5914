"""Healing without a dataset: the original model writes the text; the decoder layers train.

Tiny random Llama models (the shapes of tests/test_heal.py) and a character tokenizer; the
evaluation texts' n-grams are replaced by a small set, so the tests need no evaluation data.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import Interrupted, build_tiny_tokenizer, interrupt_at

from layerfold.errors import LayerfoldError
from layerfold.models.load import wrap_model
from layerfold.plan import Operation, Plan
from layerfold.recover import heal, make_config
from layerfold.recover import selftext as st
from layerfold.recover.checkpoint import checkpoint_dir_for, latest_checkpoint
from layerfold.recover.selftext import SelfTextRecipe, self_text
from layerfold.surgery import apply_plan

TEXT = "the cat sat on the mat. a dog ran in the fog. " * 60


def char_tokenizer(leading_bos: bool = False):
    """conftest's character tokenizer (ids 0 pad, 1 BOS, 2 EOS, 3 unk, then one per printable
    character); with ``leading_bos``, BOS in front of every text it encodes (as Gemma's and Llama's
    tokenizers do)."""
    from tokenizers import processors

    tok = build_tiny_tokenizer(vocab_size=100)
    if leading_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh layerfold cache per test, and a known 'evaluation text' instead of the real ones."""
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(st, "evaluation_ngrams", lambda tokenizer: (torch.empty(0, dtype=torch.int64), []))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "repeated.txt"
    path.write_text(TEXT)
    return str(path)


def llama(layers: int = 3, vocab: int = 100):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2)).eval()


def pruned_of(dense):
    student = copy.deepcopy(dense)
    apply_plan(student, Plan(method="test", num_layers=3, operations=[Operation("drop", 1, 1)]))
    return student


RECIPE = SelfTextRecipe(seeds="bos", length=24, batch=4, seed=5)


def test_self_text_is_cached_and_reused_and_extended(tokenizer):
    model = llama()
    first = self_text(model, tokenizer, RECIPE, 150, progress=False)
    assert first.record["chunks_generated_now"] >= 1 and len(first.stream) == 150
    again = self_text(model, tokenizer, RECIPE, 150, progress=False)
    assert again.record["chunks_generated_now"] == 0 and torch.equal(again.stream, first.stream)
    more = self_text(model, tokenizer, RECIPE, 400, progress=False)
    assert more.record["chunks_generated_now"] == more.record["chunks"] - first.record["chunks"]
    assert torch.equal(more.stream[:150], first.stream)
    seeds = st.seed_ids(tokenizer, RECIPE)
    folder = st.cache_folder(model, RECIPE, seeds)
    assert json.loads((folder / "recipe.json").read_text()) == RECIPE.model_dump()
    other = RECIPE.model_copy(update={"temperature": 0.7})
    assert st.cache_folder(model, other, seeds) != folder
    assert st.cache_folder(model, RECIPE, seeds + 1) != folder  # other seed tokens: another text
    assert st.model_fingerprint(llama(vocab=101)) != st.model_fingerprint(model)


def test_samples_follow_the_recipe(tokenizer):
    written = self_text(llama(), tokenizer, RECIPE, 100, progress=False)
    recipe = written.record["recipe"]
    assert recipe == {**RECIPE.model_dump()}
    samples = [s for s in torch.tensor_split(written.stream, torch.where(written.stream == 2)[0]) if len(s)]
    assert all(len(s[s != 2]) <= 1 + RECIPE.length for s in samples)  # the BOS seed + at most `length` new tokens
    assert written.stream[0].item() == tokenizer.bos_token_id


def test_filter_drops_short_repeated_and_contaminated_samples(tokenizer):
    eval_text = torch.arange(10, 40)
    keep = st._Filter(tokenizer, seed_len=1, eval_hashes=torch.unique(st.window_hashes(eval_text[None])[0]))
    new = torch.arange(50, 80)
    rows = torch.stack([
        torch.cat([torch.tensor([1]), new]),  # kept
        torch.cat([torch.tensor([1]), new]),  # the same sample again: a duplicate
        torch.cat([torch.tensor([1, 60, 61, 2]), torch.full((27,), 2)]),  # ends after two tokens: short
        torch.cat([torch.tensor([1]), eval_text]),  # copies an evaluation text
    ])
    kept = keep(rows)
    assert len(kept) == 1 and torch.equal(kept[0], rows[0])
    assert keep.counts == {"samples": 4, "kept": 1, "short": 1, "duplicate": 1, "contaminated": 1}


def test_seeds_come_from_the_calibration_half_only(tokenizer, monkeypatch):
    from layerfold.data import sources

    calibration = [f"calib {i} passage text" for i in range(3)]
    evaluation = [f"EVAL {i} passage text" for i in range(3)]
    monkeypatch.setattr(sources, "lambada_passages", lambda: calibration + evaluation)
    monkeypatch.setattr(sources, "BOOKS_SPLIT", 3)
    seeds = st.seed_ids(tokenizer, SelfTextRecipe(seed_tokens=7))
    assert sorted(tokenizer.decode(s).replace(" ", "") for s in seeds) == ["calib0", "calib1", "calib2"]


def test_models_that_expect_bos_get_it_in_front_of_seeds_and_blocks(monkeypatch, tmp_path):
    """A tokenizer that puts BOS in front of every text (Gemma, Llama) marks a model trained that
    way: the openings it writes from and every training block then start with BOS; a tokenizer
    that does not (SmolLM2) gets neither."""
    from layerfold.data import sources
    from layerfold.data.tokens import leading_bos
    from layerfold.recover.data import token_blocks

    plain, with_bos = char_tokenizer(), char_tokenizer(leading_bos=True)
    assert leading_bos(plain) is None and leading_bos(with_bos) == 1
    monkeypatch.setattr(sources, "lambada_passages", lambda: ["abcdefghij", "klmnopqrst"])
    monkeypatch.setattr(sources, "BOOKS_SPLIT", 2)
    recipe = SelfTextRecipe(seed_tokens=4)
    assert st.seed_ids(plain, recipe).tolist() == [plain.encode(t, add_special_tokens=False) for t in ("abcd", "klmn")]
    assert st.seed_ids(with_bos, recipe).tolist() == [with_bos.encode(t) for t in ("abcd", "klmn")]
    path = tmp_path / "t.txt"
    path.write_text("abcdefghijk")
    ids = plain.encode("abcdefghijk", add_special_tokens=False)
    assert token_blocks(plain, str(path), 4).tolist() == [ids[0:4], ids[4:8]]
    assert token_blocks(with_bos, str(path), 4).tolist() == [[1, *ids[0:3]], [1, *ids[3:6]], [1, *ids[6:9]]]


def test_self_data_refuses_other_parts_and_evaluation_sets():
    with pytest.raises(LayerfoldError, match="alone"):
        make_config(data="self,books")
    with pytest.raises(LayerfoldError, match="seeds"):  # seeds are the calibration openings or BOS, nothing else
        make_config(data="self", self_text={"seeds": "wikitext2"})


def config(text_file: str, **overrides):
    options = dict(data=text_file, cutoff=16, batch_size=4, grad_accum=1, max_steps=4, lr=1e-2, warmup_steps=0,
                   eval_sources=(), checkpoint_every=0, train="layers")
    return make_config(**{**options, **overrides})


def run(model, tokenizer, cfg, out=None, **kwargs):
    return heal(wrap_model(model, tokenizer, source="student"), out, cfg, device="cpu", progress=False, **kwargs)


def test_layers_mode_changes_only_the_decoder_layers(tokenizer, text_file):
    student = pruned_of(llama())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = run(student, tokenizer, config(text_file))
    after = report.model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("model.layers.")}
    assert report.record["trained_layers"] == ["model.layers.0", "model.layers.1"]
    assert report.record["trainable_parameters"] == sum(v.numel() for k, v in before.items()
                                                        if k.startswith("model.layers."))
    assert not any(p.requires_grad for p in report.model.parameters())


def test_layers_mode_resumes_to_the_same_weights(tokenizer, text_file, tmp_path):
    dense = llama()
    teacher = wrap_model(dense, tokenizer, source="dense")
    cfg = config(text_file, max_steps=6, checkpoint_every=2, distill="dense", lr=1e-3)
    straight = run(pruned_of(dense), tokenizer, cfg, out=tmp_path / "straight", teacher=teacher)

    stop_at_5 = interrupt_at(5)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run(pruned_of(dense), tokenizer, cfg, out=out, teacher=teacher, on_step=stop_at_5)
    assert latest_checkpoint(checkpoint_dir_for(out)).name == "step-000004"
    resumed = run(pruned_of(dense), tokenizer, cfg, out=out, teacher=teacher, resume=True)
    assert resumed.record["resumed_from_step"] == 4
    assert [x["loss"] for x in resumed.losses] == pytest.approx([x["loss"] for x in straight.losses])
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def save_pruned(dense, tokenizer, tmp_path):
    """A dense folder and a pruned folder whose plan.json names it, as `layerfold prune` writes them."""
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    plan = Plan(method="test", num_layers=3, operations=[Operation("drop", 1, 1)], model=str(tmp_path / "dense"))
    student = copy.deepcopy(dense)
    apply_plan(student, plan)
    student.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    plan.save(tmp_path / "pruned" / "plan.json")
    return tmp_path / "pruned"


SELF_OPTIONS = dict(data="self", self_text=dict(seeds="bos", length=24, batch=8), max_tokens=256, cutoff=16,
                    batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=0, eval_sources=(), checkpoint_every=0)


def test_self_heal_distils_from_the_model_plan_json_names(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned = save_pruned(llama(), tokenizer, tmp_path)
    report = heal(str(pruned), tmp_path / "healed", make_config(train="layers", **SELF_OPTIONS), device="cpu",
                  progress=False)
    record = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert record["teacher"] == str(tmp_path / "dense") and record["mode"] == "layers+distill"
    assert record["data"]["self_text"]["tokens_kept"] >= 256 and record["tokens_trained"] == 256
    assert [x["step"] for x in record["losses"]] == [1, 2, 3, 4] and all(x["kl"] > 0 for x in record["losses"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, report.model(input_ids=ids).logits, rtol=0,
                                   atol=1e-6)
    assert (tmp_path / "healed" / "plan.json").is_file()


def test_self_heal_without_a_named_original_says_what_to_do(tokenizer, tmp_path):
    dense = llama()
    dense.save_pretrained(tmp_path / "lonely")
    tokenizer.save_pretrained(tmp_path / "lonely")
    with pytest.raises(LayerfoldError, match="--distill ORIGINAL"):
        heal(str(tmp_path / "lonely"), tmp_path / "out", make_config(**SELF_OPTIONS), device="cpu", progress=False)


def test_cli_heals_with_self_written_text(tokenizer, tmp_path):
    from typer.testing import CliRunner

    from layerfold.cli import app, register_all

    pruned = save_pruned(llama(), tokenizer, tmp_path)
    register_all()
    args = ["heal", str(pruned), "--data", "self", "--train", "layers", "--out", str(tmp_path / "healed"),
            "--max-tokens", "256", "--batch-size", "4", "--grad-accum", "2", "--cutoff", "16", "--eval", "",
            "--device", "cpu", "--gen-seeds", "bos", "--gen-length", "24", "--gen-batch", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert record["steps"] == 2 and record["train"] == "layers" and record["data"]["spec"] == "self"
    bad = CliRunner().invoke(app, args[:-1] + ["0"])  # checked before any model is loaded
    assert isinstance(bad.exception, LayerfoldError) and "self_text.batch" in str(bad.exception)


def test_self_text_trains_the_layers_unless_told_otherwise():
    chosen = make_config(data="self")
    assert (chosen.train, chosen.lr, chosen.mode) == ("layers", 2e-4, "layers+distill")
    assert (make_config().train, make_config().lr) == ("lora", 1e-4)
    assert make_config(data="self", train="lora", lr=1e-3).lr == 1e-3


def test_the_original_model_is_read_from_plan_json(tmp_path):
    from layerfold.models.default import DEFAULT_MODEL_NAME
    from layerfold.recover.heal import original_model

    def folder_with(model: str):
        folder = tmp_path / f"pruned-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        Plan(method="test", num_layers=3, operations=[Operation("drop", 1, 1)], model=model).save(folder / "plan.json")
        return str(folder)

    assert original_model(folder_with(DEFAULT_MODEL_NAME)) == "default"
    assert original_model(folder_with("HuggingFaceTB/SmolLM2-135M")) == "HuggingFaceTB/SmolLM2-135M"
    assert original_model(folder_with(str(tmp_path))) == str(tmp_path)
    with pytest.raises(LayerfoldError, match="not found"):
        original_model(folder_with("/gone/model"))
