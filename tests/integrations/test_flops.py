"""Tests for FLOP counting on a tiny transformer: the count, the untouched state, the fallback."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lossforecast.integrations.flops import (  # noqa: E402
    FlopCount,
    count_flops,
    cuda_device_ids,
    device_peak_flops,
    estimate_flops,
)

VOCAB, SEQ, BATCH, WIDTH, LAYERS = 48, 16, 4, 32, 2


class TinyLM(torch.nn.Module):
    """A two-layer decoder-only transformer with dropout and a BatchNorm (for state checks)."""

    def __init__(self, dropout=0.1):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(
            WIDTH, 4, 4 * WIDTH, dropout=dropout, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = torch.nn.BatchNorm1d(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, input_ids, labels):
        h = self.blocks(self.tok(input_ids), mask=self.mask, is_causal=True)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        logits = self.head(h)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return model, ids


def test_counted_flops_are_near_six_n_d(model_and_batch):
    model, ids = model_and_batch
    count = count_flops(model, ids, labels=ids)
    assert isinstance(count, FlopCount) and count.method == "counted"
    assert count.tokens == BATCH * SEQ
    assert count.forward + count.backward == count.flops
    assert 1.5 < count.backward / count.forward < 2.5  # backward is about twice the forward
    estimate = estimate_flops(
        count.n_params, count.tokens, n_layers=LAYERS, seq_len=SEQ, d_model=WIDTH
    )
    assert 0.5 < count.flops / estimate.flops < 2.0
    assert count.flops_per_token == pytest.approx(count.flops / (BATCH * SEQ))


def test_counting_leaves_the_training_state_alone(model_and_batch):
    model, ids = model_and_batch
    model.train()
    model(ids, ids).backward()  # the user has gradients already
    model.head.bias.grad = None  # and one parameter without
    grads = {
        n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
    }
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    count_flops(model, ids, labels=ids)

    for name, p in model.named_parameters():
        before, values = grads[name]
        assert p.grad is before, name  # the same tensor object (or still None) ...
        if values is not None:
            assert torch.equal(p.grad, values), name  # ... with the same values
        assert torch.equal(p.detach(), params[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # BatchNorm statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws the same next batch
    assert model.training


def test_counting_keeps_eval_mode(model_and_batch):
    model, ids = model_and_batch
    model.eval()
    count = count_flops(model, ids, labels=ids)
    assert count.method == "counted" and not model.training


class NoLoss(torch.nn.Module):
    """A model whose output has no loss to call backward on."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, WIDTH)
        self.attn = torch.nn.MultiheadAttention(WIDTH, 4, batch_first=True)
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids):
        h = self.tok(input_ids)
        self.head(self.attn(h, h, h)[0])
        return {"text": "no tensors here"}


def test_fallback_estimate_when_counting_fails(caplog):
    torch.manual_seed(0)
    model = NoLoss()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    count = count_flops(model, input_ids=ids)
    assert count.method == "estimate"
    assert "estimate" in count.note and "Counting failed: TypeError" in count.note
    n = sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("tok."))
    assert count.n_params == n
    expected = estimate_flops(n, BATCH * SEQ, n_layers=1, seq_len=SEQ, d_model=WIDTH)
    assert count.flops == expected.flops
    assert all(p.grad is None for p in model.parameters())


def test_fallback_needs_a_token_count():
    model = NoLoss()
    with pytest.raises(RuntimeError, match="no token count"):
        count_flops(model, input_ids=torch.zeros(BATCH, SEQ))  # float: not token ids


def test_estimate_without_the_attention_shape_says_so():
    est = estimate_flops(1_000, 10)
    assert (est.flops, est.method) == (60_000.0, "estimate")
    assert "attention term left out" in est.note


@pytest.mark.parametrize(("n_params", "tokens"), [(0, 10), (10, 0), (1.5, 10), (True, 10)])
def test_estimate_rejects_bad_sizes(n_params, tokens):
    with pytest.raises(ValueError, match="must be a positive int"):
        estimate_flops(n_params, tokens)


def test_device_peak_on_cpu_and_given_peak():
    assert device_peak_flops("cpu", torch.bfloat16) is None
    assert device_peak_flops(torch.device("cpu"), peak=2e12) == 2e12
    with pytest.raises(ValueError, match="`peak`"):
        device_peak_flops("cpu", peak=0)
    assert cuda_device_ids("cpu") == []
