"""Healing: LoRA fine-tuning and distillation on tiny random models (Llama, Qwen2, GPT-2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import Interrupted, interrupt_at

from layerfold.errors import LayerfoldError
from layerfold.models.load import wrap_model
from layerfold.plan import Operation, Plan
from layerfold.recover import heal, make_config
from layerfold.recover.checkpoint import checkpoint_dir_for, latest_checkpoint
from layerfold.recover.data import block_order, data_parts, load_heal_text, parse_hub_spec, token_blocks
from layerfold.recover.distill import hidden_mismatch, logits_kl, next_token_ce
from layerfold.recover.lora import projection_names
from layerfold.surgery import apply_plan

TEXT = "the cat sat on the mat. a dog ran in the fog. " * 60


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "repeated.txt"
    path.write_text(TEXT)
    return str(path)


def small_model(kind: str, vocab: int = 97):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64)).eval()
    raise ValueError(kind)


def config(text_file: str, **overrides):
    options = dict(data=text_file, cutoff=16, batch_size=4, grad_accum=1, max_steps=4, lr=1e-2, warmup_steps=0,
                   eval_sources=(text_file,), eval_windows=3, eval_seq_len=16, checkpoint_every=0)
    return make_config(**{**options, **overrides})


def run(model, tokenizer, cfg, out=None, **kwargs):
    return heal(wrap_model(model, tokenizer), out, cfg, device="cpu", progress=False, **kwargs)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_targets_are_every_projection_inside_the_decoder_layers(kind):
    model = small_model(kind)
    names = projection_names(model)
    per_layer = len(names) // 3
    assert len(names) == 3 * per_layer and per_layer >= 4
    assert all(".h." in n or ".layers." in n for n in names)
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_loss_goes_down_on_repeated_text(kind, tokenizer, text_file):
    report = run(small_model(kind), tokenizer, config(text_file, max_steps=20))
    losses = [log["loss"] for log in report.losses]
    assert len(losses) == 20 and [log["step"] for log in report.losses] == list(range(1, 21))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1
    source = text_file
    assert report.perplexity_after[source] < report.perplexity_before[source]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_output_reloads_with_plain_transformers(kind, tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = small_model(kind)
    apply_plan(model, Plan(method="test", num_layers=3, operations=[Operation("drop", 1, 1)]))
    report = run(model, tokenizer, config(text_file, max_steps=3), out=tmp_path / "healed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    assert not [n for n, _ in reloaded.named_modules() if "lora" in n.lower()]
    assert not [k for k in reloaded.state_dict() if "lora" in k.lower()]
    assert not [n for n, _ in report.model.named_modules() if "lora" in n.lower()]
    ids = torch.tensor([tokenizer(TEXT[:40])["input_ids"]])
    with torch.no_grad():
        expected = report.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    record = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert record["steps"] == 3 and record["mode"] == "lora" and len(record["losses"]) == 3
    assert reloaded.config.to_dict().get("num_hidden_layers", reloaded.config.to_dict().get("n_layer")) == 2


def test_healing_changes_the_weights(tokenizer, text_file):
    model = small_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run(model, tokenizer, config(text_file, max_steps=2))
    after = report.model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)


def test_resume_continues_at_the_right_step(tokenizer, text_file, tmp_path):
    cfg = config(text_file, max_steps=6, checkpoint_every=2)
    straight = run(small_model("llama"), tokenizer, cfg, out=tmp_path / "straight")

    stop_at_5 = interrupt_at(5)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run(small_model("llama"), tokenizer, cfg, out=out, on_step=stop_at_5)
    assert latest_checkpoint(checkpoint_dir_for(out)).name == "step-000004"
    with pytest.raises(LayerfoldError, match="--resume"):
        run(small_model("llama"), tokenizer, cfg, out=out)

    seen: list[int] = []
    resumed = run(small_model("llama"), tokenizer, cfg, out=out, resume=True, on_step=lambda s, _: seen.append(s))
    assert seen == [5, 6]
    assert resumed.record["resumed_from_step"] == 4
    assert [log["step"] for log in resumed.losses] == [1, 2, 3, 4, 5, 6]
    assert [log["loss"] for log in resumed.losses] == pytest.approx([log["loss"] for log in straight.losses])
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not checkpoint_dir_for(out).exists()


def test_resume_refuses_another_recipe(tokenizer, text_file, tmp_path):
    def stop_at_3(step, log):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(small_model("llama"), tokenizer, config(text_file, max_steps=4, checkpoint_every=2), out=out,
            on_step=stop_at_3)
    with pytest.raises(LayerfoldError, match="lr"):
        run(small_model("llama"), tokenizer, config(text_file, max_steps=4, checkpoint_every=2, lr=1e-3), out=out,
            resume=True)


def test_distillation_loss_is_zero_when_student_is_teacher(tokenizer, text_file):
    student = small_model("llama")
    teacher = wrap_model(copy.deepcopy(student), tokenizer, source="teacher")
    cfg = config(text_file, max_steps=1, distill="teacher", hidden_weight=1.0, ce_weight=0.0)
    report = run(student, tokenizer, cfg, teacher=teacher)
    first = report.losses[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["hidden"] == pytest.approx(0.0, abs=1e-9)
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    assert report.record["mode"] == "lora+distill" and report.record["teacher"] == "teacher"


def test_distillation_pulls_a_pruned_student_towards_its_teacher(tokenizer, text_file):
    teacher_model = small_model("llama")
    student = copy.deepcopy(teacher_model)
    apply_plan(student, Plan(method="test", num_layers=3, operations=[Operation("drop", 1, 1)]))
    teacher = wrap_model(teacher_model, tokenizer, source="teacher")
    report = run(student, tokenizer, config(text_file, max_steps=15, distill="teacher"), teacher=teacher)
    kls = [log["kl"] for log in report.losses]
    assert kls[0] > 1e-4 and sum(kls[-3:]) / 3 < kls[0]


@pytest.mark.parametrize("slice_elements", [7, 50, 2**26])  # slices inside a block, across blocks, all at once
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_logit_losses_match_torch(slice_elements, dtype, monkeypatch):
    """The sliced losses and their gradients are torch's KL and cross-entropy on ``logits[:, :-1]``."""
    from layerfold.recover import distill

    monkeypatch.setattr(distill, "SLICE_ELEMENTS", slice_elements)
    gen = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 6, 11, generator=gen)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(3, 6, 11, generator=gen)).to(dtype)
    ids = torch.randint(0, 11, (3, 6), generator=gen)

    def torch_kl(s, t, temperature):
        s = F.log_softmax(s[:, :-1].float().flatten(0, 1) / temperature, dim=-1)
        t = F.log_softmax(t[:, :-1].float().flatten(0, 1) / temperature, dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2

    def torch_ce(logits, ids):
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    ulp = 0 if dtype == torch.float32 else 2**-8  # bf16 gradients may round once more (relative)
    for ours, theirs in ((lambda s: logits_kl(s, teacher, 2.0), lambda s: torch_kl(s, teacher, 2.0)),
                         (lambda s: logits_kl(s, teacher), lambda s: torch_kl(s, teacher, 1.0)),
                         (lambda s: next_token_ce(s, ids), lambda s: torch_ce(s, ids))):
        value, (grad,) = ours(student), torch.autograd.grad(0.5 * ours(student), student)
        expected, (expected_grad,) = theirs(student), torch.autograd.grad(0.5 * theirs(student), student)
        assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        assert expected_grad[:, -1].abs().max() == 0 and grad[:, -1].abs().max() == 0
        torch.testing.assert_close(grad.float(), expected_grad.float(), atol=1e-7, rtol=2 * ulp + 1e-5)


def test_distillation_losses():
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert float(logits_kl(a, a, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logits_kl(a, b)) > 0
    assert float(hidden_mismatch(a, a)) == 0.0
    assert float(hidden_mismatch(2 * a, a)) == pytest.approx(1.0)


def test_data_refuses_evaluation_sets_and_parses_hub_specs():
    for name in ("wikitext2", "ptb", "lambada"):
        with pytest.raises(LayerfoldError, match="evaluation set"):
            data_parts(f"books,{name}")
    assert parse_hub_spec("hf:allenai/c4:en:train[:1%]") == ("allenai/c4", "en", "train[:1%]")
    assert parse_hub_spec("hf:roneneldan/TinyStories:train") == ("roneneldan/TinyStories", None, "train")
    with pytest.raises(LayerfoldError):
        parse_hub_spec("hf:only-a-name")
    with pytest.raises(LayerfoldError, match="test split"):
        load_heal_text("hf:Salesforce/wikitext:wikitext-2-raw-v1:test")


def test_blocks_and_order_are_deterministic(tokenizer, text_file):
    blocks = token_blocks(tokenizer, text_file, 16)
    assert blocks.shape == (len(TEXT) // 16, 16)
    order = block_order(len(blocks), 2 * len(blocks) + 3, seed=7)
    assert torch.equal(order, block_order(len(blocks), 2 * len(blocks) + 3, seed=7))
    assert sorted(order[:len(blocks)].tolist()) == list(range(len(blocks)))
    assert not torch.equal(order, block_order(len(blocks), 2 * len(blocks) + 3, seed=8))


def test_config_validation():
    with pytest.raises(LayerfoldError, match="max_steps"):
        make_config(max_steps=3, max_tokens=100)
    with pytest.raises(LayerfoldError, match="distill"):
        make_config(hidden_weight=1.0)
    with pytest.raises(LayerfoldError, match="rank"):
        make_config(rank=0)


def test_cli_heals_a_model_folder(tokenizer, text_file, tmp_path):
    from typer.testing import CliRunner

    from layerfold.cli import app, register_all

    model = small_model("qwen2")
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    register_all()
    args = ["heal", str(tmp_path / "pruned"), "--data", text_file, "--out", str(tmp_path / "healed"),
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--cutoff", "16", "--eval", "",
            "--device", "cpu", "--lr", "1e-3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert record["steps"] == 2 and record["tokens_trained"] == 2 * 2 * 2 * 16
    assert record["command"].startswith("layerfold")
