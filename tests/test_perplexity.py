"""Perplexity on cases computed by hand: window cutting (with and without BOS) and the NLL."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB

from layerfold.errors import LayerfoldError
from layerfold.evaluate.perplexity import perplexity, perplexity_of_windows, windows_from_stream


class Bigram(torch.nn.Module):
    """Logits at position t depend only on token t: a table we can score by hand."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=gen))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def _nll_by_hand(model: Bigram, windows: list[list[int]]) -> tuple[float, int]:
    """Mean over every window position t >= 1 of -log p(x_t | x_{t-1}), in float64 loops."""
    table = model.table.detach().double()
    total, count = 0.0, 0
    for window in windows:
        for prev, nxt in zip(window[:-1], window[1:], strict=True):
            row = table[prev]
            total += float(torch.logsumexp(row, 0) - row[nxt])
            count += 1
    return total / count, count


def test_windows_without_bos():
    stream = torch.arange(10, 21)  # 11 tokens
    windows = windows_from_stream(stream, seq_len=4, bos_id=None)
    assert windows.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]  # the partial tail is dropped
    assert windows_from_stream(stream, 4, None, max_windows=1).tolist() == [[10, 11, 12, 13]]


def test_windows_with_bos():
    stream = torch.arange(10, 21)
    windows = windows_from_stream(stream, seq_len=4, bos_id=1)
    # BOS + 3 text tokens each; consecutive, non-overlapping text
    assert windows.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]
    assert windows.dtype == stream.dtype


def test_too_short_text():
    with pytest.raises(LayerfoldError, match="fewer than one window"):
        windows_from_stream(torch.arange(3), seq_len=4, bos_id=None)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_nll_formula_by_hand(batch_size):
    model = Bigram(VOCAB)
    windows = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(3))
    nll, scored = perplexity_of_windows(model, windows, bos=False, batch_size=batch_size, progress=False)
    expected, count = _nll_by_hand(model, windows.tolist())
    assert scored == count == 5 * 8
    assert nll == pytest.approx(expected, rel=1e-5)


def test_nll_matches_transformers_loss(tiny_model):
    """Equal-length windows: the mean NLL is the mean of transformers' own shifted CE losses."""
    model = tiny_model("llama")
    windows = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(4))
    nll, scored = perplexity_of_windows(model, windows, bos=False, batch_size=3, progress=False)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert scored == 4 * 9
    assert nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("bos", [False, True])
def test_perplexity_end_to_end_by_hand(bos, tmp_path, tiny_tokenizer):
    text = "the cat sat on the mat; the dog sat on the log. " * 3
    path = tmp_path / f"text-{bos}.txt"
    path.write_text(text)
    model = Bigram(VOCAB, seed=5)
    result = perplexity(model, tiny_tokenizer, str(path), seq_len=16, bos=bos, batch_size=2, progress=False)

    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    step = 15 if bos else 16
    n = len(ids) // step
    windows = [([tiny_tokenizer.bos_token_id] if bos else []) + ids[i * step:(i + 1) * step] for i in range(n)]
    expected, count = _nll_by_hand(model, windows)
    assert result.windows == n
    assert result.tokens_scored == count == n * 15
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.bos is bos and result.seq_len == 16
    assert ("BOS first" in result.protocol) is bos
    assert f"{n} non-overlapping windows of 16 tokens" in result.protocol


def test_bos_needs_a_bos_token(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 4)
    tiny_tokenizer.bos_token = None
    with pytest.raises(LayerfoldError, match="no BOS token"):
        perplexity(Bigram(VOCAB), tiny_tokenizer, str(path), seq_len=8, bos=True, progress=False)


def test_seq_len_too_small(tiny_tokenizer):
    with pytest.raises(LayerfoldError, match="at least 2"):
        perplexity(Bigram(VOCAB), tiny_tokenizer, "ptb", seq_len=1, progress=False)


def test_unknown_source(tiny_tokenizer):
    with pytest.raises(LayerfoldError, match="Did you mean 'wikitext2'"):
        perplexity(Bigram(VOCAB), tiny_tokenizer, "wikitext", progress=False)


def test_unpruned_check_is_remembered_per_weights(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    """``perplexities(remember=True)`` measures a model once and reads the figure back after that;
    other weights (or no ``remember``) are measured anew, and a damaged cache entry is measured again."""
    from layerfold.evaluate.perplexity import perplexities

    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat; the dog sat on the log. " * 12)
    calls = []

    def loaded_of(model):
        from layerfold.models.load import wrap_model

        model.register_forward_hook(lambda *_: calls.append(1))
        loaded = wrap_model(model.eval())
        loaded.tokenizer = tiny_tokenizer
        return loaded

    first = loaded_of(tiny_model("llama"))
    measured = perplexities(first, (str(text),), None, progress=False, remember=True)
    assert len(calls) == 1
    assert perplexities(first, (str(text),), None, progress=False, remember=True) == measured
    assert len(calls) == 1  # read back, not measured
    assert perplexities(first, (str(text),), None, progress=False) == measured
    assert len(calls) == 2  # without remember: measured
    memo = next((tmp_path / "cache" / "perplexity").glob("*.json"))
    memo.write_text("{not json")
    assert perplexities(first, (str(text),), None, progress=False, remember=True) == measured
    assert len(calls) == 3
    other = loaded_of(tiny_model("llama"))
    with torch.no_grad():
        next(other.model.model.layers[0].parameters()).add_(1.0)
    perplexities(other, (str(text),), None, progress=False, remember=True)
    assert len(calls) == 4


def test_bos_by_default_only_where_the_tokenizer_puts_it_in_front(tmp_path, tiny_tokenizer):
    """Without ``bos``, windows start with BOS exactly when the tokenizer puts BOS in front of every
    text (Gemma's and Llama's do, SmolLM2's does not)."""
    from tokenizers import processors

    path = tmp_path / "t.txt"
    path.write_text("the cat sat on the mat; the dog sat on the log. " * 3)
    model = Bigram(VOCAB, seed=3)

    def nll(bos):
        return perplexity(model, tiny_tokenizer, str(path), seq_len=16, bos=bos, progress=False).nll

    plain = perplexity(model, tiny_tokenizer, str(path), seq_len=16, progress=False)
    assert plain.bos is False and plain.nll == nll(False) != nll(True)
    bos_id = tiny_tokenizer.bos_token_id
    tiny_tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", bos_id)])
    led = perplexity(model, tiny_tokenizer, str(path), seq_len=16, progress=False)
    assert led.bos is True and led.nll == nll(True)


@pytest.mark.parametrize("leading", [False, True])
def test_prune_check_and_card_say_whether_windows_start_with_bos(leading, tmp_path, tiny_model_dir, monkeypatch):
    """``layerfold prune``'s before/after check follows the same rule, and its model card says which."""
    from tokenizers import processors

    from layerfold import api
    from layerfold.models.load import load_model
    from layerfold.plan import Operation, Plan, PlanResult

    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(tiny_model_dir("llama")))
    if leading:
        bos_id = loaded.tokenizer.bos_token_id
        loaded.tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos_id)])
    n = loaded.model.config.num_hidden_layers
    plan = PlanResult(plan=Plan(method="manual", num_layers=n, operations=[Operation("drop", n - 1, n - 1)]))
    report = api.prune(loaded, tmp_path / "out", plan=plan, ppl=("ptb",), ppl_windows=2, progress=False)
    assert report.ppl_bos is leading
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("2, BOS first)" in card) is leading and ("2, no BOS)" in card) is not leading
