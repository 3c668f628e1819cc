"""Tests for lossforecast.integrations.torch: Probes, observe_attention, AmpReader."""

from __future__ import annotations

import copy
import logging
import math
import time

import pytest

torch = pytest.importorskip("torch")
from lossforecast.integrations import torch as lf_torch  # noqa: E402
from lossforecast.integrations.torch import (  # noqa: E402
    AmpReader,
    Probes,
    find_grad_scaler,
    observe_attention,
)
from torch import nn  # noqa: E402


def explicit_max(q, k, scale=None):
    """max of scale · q kᵀ over everything, k heads repeated for grouped queries."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return float((q.double() @ k.double().transpose(-1, -2)).max() * s)


def step_once(model, probes, opt, x, step, loss_fn=None):
    out = model(x) if loss_fn is None else loss_fn(model, x)
    loss = out.float().pow(2).mean() if torch.is_tensor(out) else out
    opt.zero_grad()
    loss.backward()
    probes.before_optimizer_step(step)
    opt.step()
    return probes.after_optimizer_step(step)


# ---------------------------------------------------------------------------- hand-written
class HandAttention(nn.Module):
    def __init__(self, d=16, heads=2, kv_heads=2):
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, self.hd * kv_heads)
        self.o = nn.Linear(d, d)
        self.seen = []

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.kvh, -1).transpose(1, 2)
        self.seen.append((q.detach().clone(), k.detach().clone()))
        observe_attention(self, q, k, scale=0.5)
        kk = k.repeat_interleave(self.h // self.kvh, dim=1)
        y = nn.functional.scaled_dot_product_attention(q, kk, kk, scale=0.5, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class HandModel(nn.Module):
    def __init__(self, kv_heads=2):
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.layers = nn.ModuleList(HandAttention(kv_heads=kv_heads) for _ in range(2))
        self.head = nn.Linear(16, 11)

    def forward(self, x):
        h = self.emb(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_observe_attention_matches_the_explicit_product(kv_heads):
    torch.manual_seed(0)
    model = HandModel(kv_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 11, (3, 7))
    with Probes(model, opt, every_n_steps=1) as probes:
        metrics = step_once(model, probes, opt, x, 0)
    per_layer = [explicit_max(*layer.seen[0], scale=0.5) for layer in model.layers]
    assert metrics["attn_logit_max/layer0"] == pytest.approx(per_layer[0], rel=1e-5)
    assert metrics["attn_logit_max/layer1"] == pytest.approx(per_layer[1], rel=1e-5)
    assert metrics["attn_logit_max"] == pytest.approx(max(per_layer), rel=1e-5)


def test_observe_attention_is_a_no_op_when_not_attached_and_never_raises(caplog):
    m = HandAttention()
    assert observe_attention(m, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8)) is None
    model = HandModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probes(model, opt, every_n_steps=1), caplog.at_level(logging.WARNING):
        # wrong shapes on a sampled step: logged once, the probe turns off, no exception
        observe_attention(model.layers[0], torch.zeros(2, 3), torch.zeros(2, 3))
        observe_attention(model.layers[0], torch.zeros(2, 3), torch.zeros(2, 3))
    assert caplog.text.count("attention probe failed") == 1
    observe_attention(model.layers[0], torch.zeros(2, 3), torch.zeros(2, 3))  # detached


# ---------------------------------------------------------------------------- MHA
class MHAModel(nn.Module):
    def __init__(self, batch_first, kdim=None):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(13, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.proj = nn.Linear(16, kdim or 16)
        self.head = nn.Linear(16, 13)

    def forward(self, x):
        h = self.emb(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        kv = self.proj(h)
        y, _ = self.attn(h, kv, kv, need_weights=False)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)


def mha_explicit(model, x):
    m = model.attn
    h = model.emb(x)
    kv = model.proj(h)
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    q = h @ wq.T + m.in_proj_bias[:e]
    k = kv @ wk.T + m.in_proj_bias[e : 2 * e]
    b, t, _ = q.shape
    q = q.view(b, t, 4, -1).transpose(1, 2)
    k = k.view(b, t, 4, -1).transpose(1, 2)
    return explicit_max(q, k)


@pytest.mark.parametrize(("batch_first", "kdim"), [(True, None), (False, None), (True, 8)])
def test_multihead_attention_found_and_matches(batch_first, kdim):
    torch.manual_seed(1)
    model = MHAModel(batch_first, kdim)
    x = torch.randint(0, 13, (2, 5))
    with torch.no_grad():
        expected = mha_explicit(model, x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Probes(model, opt, every_n_steps=1) as probes:
        assert probes.attention_layers == ["attn"]
        assert probes.lm_head is model.head
        metrics = step_once(model, probes, opt, x, 0)
    assert metrics["attn_logit_max"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def capture_eager(monkeypatch, module):
    """Wrap the model file's eager attention to record the true max logit of each call."""
    seen = []
    original = module.eager_attention_forward

    def wrapper(mod, query, key, value, attention_mask, scaling=None, **kwargs):
        s = query.size(-1) ** -0.5 if scaling is None else scaling
        seen.append(explicit_max(query.detach(), key.detach(), s))
        return original(mod, query, key, value, attention_mask, scaling=scaling, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", wrapper)
    return seen


def hf_step(model, x, probes, opt, step=0):
    out = model(input_ids=x, labels=x)
    opt.zero_grad()
    out.loss.backward()
    probes.before_optimizer_step(step)
    opt.step()
    return probes.after_optimizer_step(step), out.logits.detach()


def gpt2(impl):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    cfg._attn_implementation = impl
    return GPT2LMHeadModel(cfg)


def llama(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize(
    ("build", "module_name"),
    [
        (gpt2, "transformers.models.gpt2.modeling_gpt2"),
        (llama, "transformers.models.llama.modeling_llama"),
    ],
)
def test_hf_attention_matches_eager_and_sdpa(monkeypatch, build, module_name):
    import importlib

    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = capture_eager(monkeypatch, importlib.import_module(module_name))
    results = {}
    for impl in ("eager", "sdpa"):
        model = build(impl)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with Probes(model, opt, every_n_steps=1) as probes:
            assert len(probes.attention_layers) == 2
            assert probes.lm_head is model.get_output_embeddings()
            metrics, logits = hf_step(model, x, probes, opt)
        results[impl] = metrics
        lse = torch.logsumexp(logits.float(), -1)
        assert metrics["output_logsumexp"] == pytest.approx(float(lse.mean()), rel=1e-5)
        assert metrics["output_logit_max"] == pytest.approx(float(logits.max()), rel=1e-5)
    assert len(seen) == 2  # the eager run, one call per layer
    for i, value in enumerate(seen):
        assert results["eager"][f"attn_logit_max/layer{i}"] == pytest.approx(value, rel=1e-4)
        assert results["sdpa"][f"attn_logit_max/layer{i}"] == pytest.approx(value, rel=1e-4)


# ---------------------------------------------------------------------------- other metrics
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 8), nn.Linear(8, 5)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def test_norms_update_ratio_and_adam_state_match_explicit_values():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-6)
    x = torch.randn(4, 6)
    probes = Probes(model, opt, every_n_steps=1).attach()
    step_once(model, probes, opt, x, 0)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probes.before_optimizer_step(1)
    opt.step()
    metrics = probes.after_optimizer_step(1)
    probes.detach()
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert metrics["grad_norm"] == pytest.approx(total, rel=1e-5)
    layer0 = math.sqrt(sum(float(g.pow(2).sum()) for n, g in grads.items() if "layers.0" in n))
    assert metrics["grad_norm/layers.0"] == pytest.approx(layer0, rel=1e-5)
    params = dict(model.named_parameters())
    pnorm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params.values()))
    assert metrics["param_norm"] == pytest.approx(pnorm, rel=1e-5)
    dnorm = math.sqrt(sum(float((params[n].detach() - before[n]).pow(2).sum()) for n in params))
    bnorm = math.sqrt(sum(float(b.pow(2).sum()) for b in before.values()))
    assert metrics["update_ratio"] == pytest.approx(dnorm / bnorm, rel=1e-4)
    vs = [opt.state[p]["exp_avg_sq"] / (1 - 0.999**2) for p in params.values()]
    n = sum(v.numel() for v in vs)
    rms = math.sqrt(sum(float(v.sum()) for v in vs) / n) / 1e-6
    assert metrics["adam_v_rms_over_eps"] == pytest.approx(rms, rel=1e-4)
    below = sum(int((v < 1e-12).sum()) for v in vs) / n
    assert metrics["adam_v_below_eps_frac"] == pytest.approx(below)
    assert metrics["nonfinite_grads"] == 0 and metrics["nonfinite_params"] == 0


def test_nonfinite_gradients_are_counted():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probes = Probes(model, opt, every_n_steps=1).attach()
    model(torch.randn(2, 6)).sum().backward()
    model.layers[0].weight.grad[0, 0] = math.nan
    probes.before_optimizer_step(0)
    opt.step()
    metrics = probes.after_optimizer_step(0)
    assert metrics["nonfinite_grads"] == 1
    assert math.isnan(metrics["grad_norm"])


def test_probing_changes_neither_outputs_nor_gradients():
    torch.manual_seed(0)
    plain = HandModel()
    probed = copy.deepcopy(plain)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, probed)]
    probes = Probes(probed, opts[1], every_n_steps=1).attach()
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randint(0, 11, (3, 7), generator=gen)
        outs = []
        for model, opt in zip((plain, probed), opts, strict=True):
            out = model(x)
            outs.append(out.detach())
            opt.zero_grad()
            out.logsumexp(-1).mean().backward()
            if model is probed:
                probes.before_optimizer_step(step)
            opt.step()
            if model is probed:
                assert probes.after_optimizer_step(step) is not None
        assert torch.equal(outs[0], outs[1])
    for a, b in zip(plain.parameters(), probed.parameters(), strict=True):
        assert torch.equal(a, b)
    probes.detach()


def test_sampling_cadence_bounds_the_work(monkeypatch):
    calls = []
    original = lf_torch._max_logit

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lf_torch, "_max_logit", counting)
    model = HandModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampled = []
    with Probes(model, opt, every_n_steps=3) as probes:
        for step in range(7):
            if step_once(model, probes, opt, torch.randint(0, 11, (2, 5)), step) is not None:
                sampled.append(step)
        model.eval()  # evaluation forwards are never probed
        with torch.no_grad():
            model(torch.randint(0, 11, (2, 5)))
    assert sampled == [0, 3, 6]
    assert len(calls) == 2 * 3  # two layers, three sampled steps


def test_a_failing_probe_logs_once_and_training_goes_on(caplog, monkeypatch):
    def boom(*args):
        raise RuntimeError("probe bug")

    monkeypatch.setattr(lf_torch, "_norms", boom)
    model = HandModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING), Probes(model, opt, every_n_steps=1) as probes:
        for step in range(3):
            metrics = step_once(model, probes, opt, torch.randint(0, 11, (2, 5)), step)
    assert "attn_logit_max" in metrics and "grad_norm" not in metrics
    assert caplog.text.count("gradients probe failed") == 1
    assert caplog.text.count("params probe failed") == 1


def sampled_steps(probes, model, opt, steps, step_seconds=0.0):
    """Train ``steps`` steps of ``model`` (each padded to ``step_seconds``); the sampled ones."""
    sampled = []
    for step in range(steps):
        if step_seconds:
            time.sleep(step_seconds)
        if step_once(model, probes, opt, torch.randn(4, 6), step) is not None:
            sampled.append(step)
    return sampled


def test_cost_budget_stretches_the_cadence_when_probing_is_expensive(monkeypatch, caplog):
    original = Probes._read_params

    def slow(self):  # a probe step that costs far more than 1% of a (sub-ms) training step
        time.sleep(0.005)
        return original(self)

    monkeypatch.setattr(Probes, "_read_params", slow)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with (
        caplog.at_level(logging.INFO),
        Probes(model, opt, every_n_steps=2, max_overhead=0.01) as probes,
    ):
        sampled = sampled_steps(probes, model, opt, 250)
    # the first sample pays one-off costs and is not counted; the second sets the cadence,
    # capped at 50 times every_n_steps
    assert probes.cadence == 100
    assert sampled == [0, 2, 100, 200]
    assert caplog.text.count("probing every 100 steps") == 1


def test_cost_budget_keeps_the_cadence_when_steps_are_long():
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Probes(model, opt, every_n_steps=10, max_overhead=0.01) as probes:
        sampled = sampled_steps(probes, model, opt, 41, step_seconds=0.05)
    assert probes.cadence == 10 and sampled == [0, 10, 20, 30, 40]
    with Probes(model, opt, every_n_steps=2) as fixed:  # no budget: never stretched
        assert sampled_steps(fixed, model, opt, 7) == [0, 2, 4, 6]


def test_constructor_checks():
    model = Tiny()
    with pytest.raises(TypeError, match="`model`"):
        Probes(object())
    with pytest.raises(ValueError, match="`every_n_steps`"):
        Probes(model, every_n_steps=0)
    with pytest.raises(ValueError, match="`lm_head`"):
        Probes(model, lm_head="nope")
    for share in (0.0, 1.0, -0.1, "1%"):
        with pytest.raises(ValueError, match="`max_overhead`"):
            Probes(model, max_overhead=share)
    assert Probes(model, lm_head=False).attach().lm_head is None
    assert Probes(model, lm_head="layers.0").attach().lm_head is model.layers[0]


def test_detach_removes_every_hook():
    model = HandModel()
    probes = Probes(model, every_n_steps=1).attach()
    assert model.layers[0] in lf_torch._ATTACHED
    probes.detach()
    assert model.layers[0] not in lf_torch._ATTACHED
    assert not model.head._forward_hooks


# ---------------------------------------------------------------------------- AMP
def test_amp_reader_reports_skipped_steps_of_a_real_grad_scaler():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    reader = AmpReader(scaler)
    seen = []
    for step in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(2, 6)).sum()).backward()
        if step == 1:
            model.layers[0].weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        seen.append(reader.read())
    assert seen == [(1024.0, False), (512.0, True), (512.0, False)]


def test_find_grad_scaler_and_no_scaler():
    scaler = torch.amp.GradScaler("cpu")

    class Plugin:
        pass

    class Trainer:
        pass

    plugin, trainer = Plugin(), Trainer()
    plugin.scaler = scaler
    trainer.precision_plugin = plugin
    assert find_grad_scaler(scaler) is scaler
    assert find_grad_scaler(plugin) is scaler
    assert find_grad_scaler(trainer) is scaler
    assert find_grad_scaler(object()) is None
    assert AmpReader(object()).read() is None
    assert AmpReader(torch.amp.GradScaler("cpu", enabled=False)).read() is None
