"""Instability probes for torch models: attention and output logits, norms, Adam state, AMP.

:class:`Probes` samples every ``every_n_steps`` optimizer steps, so its cost is bounded:

=============================  ===========================================================
``attn_logit_max``             max q·kᵀ·scale over all layers (and ``/layer{i}`` per layer)
``output_logsumexp``           mean log Z (logsumexp) of the LM-head logits
``output_logit_max``           max LM-head logit
``grad_norm``                  global gradient norm (and ``/{module}`` per layer)
``param_norm``                 global parameter norm
``update_ratio``               ‖Δθ‖ / ‖θ‖ of the step (and ``/{module}`` per layer)
``adam_v_rms_over_eps``        RMS of Adam's √v̂ over ε (gradient RMS against ε)
``adam_v_below_eps_frac``      share of Adam's √v̂ entries below ε (on strided samples)
``nonfinite_grads``            parameter tensors with a non-finite gradient
``nonfinite_params``           parameter tensors with a non-finite value
=============================  ===========================================================

Attention logits are found automatically in ``torch.nn.MultiheadAttention`` and in Hugging
Face GPT-2 and Llama-style attention (``q_proj``/``k_proj`` with rotary embeddings, grouped
heads and q/k norms), whatever their implementation (eager, sdpa): a forward pre-hook
recomputes q and k from the layer input on sampled steps only. For attention written by
hand, or through ``F.scaled_dot_product_attention``, call :func:`observe_attention` before
the dot product. The maximum is over all query-key pairs with masks ignored (the scores a
fp16 kernel computes before masking), on the first ``max_rows`` sequences of the batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ._amp import AmpReader, find_grad_scaler

__all__ = ["AmpReader", "Probes", "find_grad_scaler", "observe_attention"]

logger = logging.getLogger(__name__)

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Probes] = weakref.WeakKeyDictionary()
"""Modules of attached models -> their Probes; how :func:`observe_attention` finds them."""

_CHUNK = 1 << 24  # most q·kᵀ entries computed at once
_MAX_STRETCH = 50  # the cost budget stretches the cadence at most this many times


def observe_attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, *, scale=None) -> None:
    """Record the max attention logit of a hand-written attention layer.

    Call it in the layer's ``forward`` before the dot product. It returns at once unless the
    model is attached to :class:`Probes` (directly, or through ``Monitor(..., model=...)`` or
    a lossforecast callback) and the step is sampled, and it never raises.

    Parameters
    ----------
    module : nn.Module
        The attention layer (``self``).
    q, k : Tensor
        Queries and keys, shape ``(batch, heads, seq, head_dim)``; ``k`` may have fewer
        heads (grouped-query attention).
    scale : float, optional
        Factor of the dot product; ``1/sqrt(head_dim)`` by default.

    Examples
    --------
    >>> class Attention(nn.Module):
    ...     def forward(self, q, k, v):
    ...         observe_attention(self, q, k)
    ...         return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    """
    probes = _ATTACHED.get(module) if _ATTACHED else None
    if probes is None or not probes._collecting(module):
        return
    probes._guard("attention", probes._record_attention, module, q, k, scale)


def _max_logit(q: torch.Tensor, k: torch.Tensor, scale: float | None, rows: int) -> torch.Tensor:
    """max over (batch rows, heads, i, j) of scale · q_i·k_j, computed in float32 in chunks.

    A 0-d tensor on q's device: it is read with the step's other probes in one transfer.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)}.")
    q, k = q[:rows].detach().float(), k[:rows].detach().float()
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if hq % hk:
        raise ValueError(f"{hq} query heads are not a multiple of {hk} key heads.")
    s = d**-0.5 if scale is None else float(scale)
    # rows x key heads as one batch; grouped query heads share their key head
    q = q.reshape(b * hk, hq // hk * t, d)
    k = k.reshape(b * hk, k.shape[2], d)
    per = max(1, _CHUNK // max(1, q.shape[1] * k.shape[1]))
    with torch.no_grad():
        extremes = []
        for i in range(0, b * hk, per):
            scores = torch.matmul(q[i : i + per], k[i : i + per].transpose(-1, -2))
            extremes.append(scores.amax() if s > 0 else scores.amin())
        best = extremes[0] if len(extremes) == 1 else torch.stack(extremes)
        return (best.amax() if s > 0 else best.amin()) * s


# ---------------------------------------------------------------------------- q, k recipes
def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _mha_qk(m: nn.MultiheadAttention, args: tuple, kwargs: dict):
    query, key = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
    if query.dim() == 2:
        query, key = (
            query.unsqueeze(1 if not m.batch_first else 0),
            key.unsqueeze(1 if not m.batch_first else 0),
        )
    if not m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bias = m.in_proj_bias
    bq, bk = (None, None) if bias is None else (bias[:e], bias[e : 2 * e])
    q = nn.functional.linear(query, wq, bq)
    k = nn.functional.linear(key, wk, bk)
    h = m.num_heads
    q = q.view(*q.shape[:2], h, -1).transpose(1, 2)
    k = k.view(*k.shape[:2], h, -1).transpose(1, 2)
    return q, k, None


def _gpt2_qk(m: nn.Module, args: tuple, kwargs: dict):
    if kwargs.get("encoder_hidden_states") is not None:
        return None
    hidden = _arg(args, kwargs, 0, "hidden_states")
    q, k, _ = m.c_attn(hidden).split(m.split_size, dim=2)
    q = q.view(*q.shape[:-1], -1, m.head_dim).transpose(1, 2)
    k = k.view(*k.shape[:-1], -1, m.head_dim).transpose(1, 2)
    return q, k, float(getattr(m, "scaling", m.head_dim**-0.5))


def _llama_qk(m: nn.Module, args: tuple, kwargs: dict):
    hidden = _arg(args, kwargs, 0, "hidden_states")
    pos = _arg(args, kwargs, 1, "position_embeddings")
    shape = (*hidden.shape[:-1], -1, m.head_dim)
    q, k = m.q_proj(hidden).view(shape), m.k_proj(hidden).view(shape)
    if isinstance(getattr(m, "q_norm", None), nn.Module):
        q = m.q_norm(q)
    if isinstance(getattr(m, "k_norm", None), nn.Module):
        k = m.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if pos is not None:
        rotary = getattr(sys.modules.get(type(m).__module__), "apply_rotary_pos_emb", None)
        if rotary is None:
            raise RuntimeError(f"no apply_rotary_pos_emb next to {type(m).__name__}")
        q, k = rotary(q, k, *pos)
    return q, k, float(getattr(m, "scaling", m.head_dim**-0.5))


def _recipe(m: nn.Module) -> Callable | None:
    """How to get q and k from the inputs of ``m``, if it is a known attention layer."""
    if isinstance(m, nn.MultiheadAttention):
        return _mha_qk
    if not hasattr(m, "head_dim") or not type(m).__name__.endswith("Attention"):
        return None
    if isinstance(getattr(m, "c_attn", None), nn.Module) and not getattr(
        m, "is_cross_attention", False
    ):
        return _gpt2_qk
    if isinstance(getattr(m, "q_proj", None), nn.Module) and isinstance(
        getattr(m, "k_proj", None), nn.Module
    ):
        return _llama_qk
    return None


# ---------------------------------------------------------------------------- parameters
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _group(name: str) -> str:
    """Per-layer group of a parameter: its path up to the first layer index, else its module."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def _norms(tensors: list[torch.Tensor], ord: float = 2) -> list[torch.Tensor]:
    """L2 (or ``ord``) norm of each tensor as 0-d tensors on its device, without a sync."""
    if not tensors:
        return []
    try:
        return list(torch._foreach_norm([t.detach() for t in tensors], ord))
    except Exception:  # older torch, mixed devices, odd dtypes
        return [torch.linalg.vector_norm(t.detach().float(), ord) for t in tensors]


def _floats(tensors: list[torch.Tensor]) -> list[float]:
    """0-d tensors as floats, read back in one transfer (the probe step's only sync)."""
    if not tensors:
        return []
    try:
        stacked = torch.stack(tensors)
    except RuntimeError:  # tensors on several devices
        device = tensors[0].device
        stacked = torch.stack([t.float().to(device) for t in tensors])
    return stacked.float().cpu().tolist()


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` (one fused call where torch has it)."""
    try:
        return list(torch._foreach_mul(tensors, 1.0))
    except Exception:  # older torch, mixed devices
        return [t.clone() for t in tensors]


def _differences(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """``a[i] - b[i]`` for every i (one fused call where torch has it)."""
    try:
        return list(torch._foreach_sub(a, b))
    except Exception:  # older torch, mixed devices
        return [x - y for x, y in zip(a, b, strict=True)]


def _sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """About ``n`` evenly strided entries of ``t``, as a float view where possible."""
    flat = t.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // n))
    return flat[::stride].float()


_Reading = tuple[list[torch.Tensor], Callable[[list[float]], dict[str, float]]]
"""A probe's device scalars and how their values become metrics."""


def _resolve(pending: list[_Reading]) -> dict[str, float]:
    """Read every pending probe in one transfer and turn the values into metrics."""
    values = _floats([t for tensors, _ in pending for t in tensors])
    metrics: dict[str, float] = {}
    start = 0
    for tensors, finish in pending:
        metrics.update(finish(values[start : start + len(tensors)]))
        start += len(tensors)
    return metrics


def _n_nonfinite(values: list[float]) -> int:
    return sum(not math.isfinite(v) for v in values)


def _combine(norms: list[float], groups: list[str]) -> tuple[float, dict[str, float]]:
    total, per = 0.0, {}
    for n, g in zip(norms, groups, strict=True):
        total += n * n
        per[g] = per.get(g, 0.0) + n * n
    return math.sqrt(total), {g: math.sqrt(v) for g, v in per.items()}


class _CostBudget:
    """Stretches the probe cadence so that probing stays under a share of the training time.

    A sampled step's probe work (forward hooks, gradient and parameter reads; the read-back,
    which mostly waits for the step's own GPU work, left out) is compared with the time of a
    training step without probing; the cadence becomes the smallest multiple of ``every``
    that keeps their ratio under ``max_share``. The first sample, which pays one-off costs,
    is not counted.
    """

    def __init__(self, every: int, max_share: float | None) -> None:
        self.every, self.max_share = every, max_share
        self.stride = every
        self.work = 0.0  # probe seconds in the step under way
        self._cost: float | None = None  # running mean of a sampled step's probe seconds
        self._step: float | None = None  # running mean of a step's seconds without probing
        self._last: tuple[int, float] | None = None
        self._samples = 0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.work += time.perf_counter() - start

    def step_done(self, step: int, sampled: bool) -> None:
        """Account for optimizer step ``step``; may change :attr:`stride`."""
        now = time.perf_counter()
        work, self.work = self.work, 0.0
        if self._last is not None and step > self._last[0]:
            seconds = max(now - self._last[1] - work, 0.0) / (step - self._last[0])
            self._step = seconds if self._step is None else 0.9 * self._step + 0.1 * seconds
        self._last = (step, now)
        if not sampled or self.max_share is None:
            return
        self._samples += 1
        if self._samples == 1:
            return
        self._cost = work if self._cost is None else 0.7 * self._cost + 0.3 * work
        if not self._step:
            return
        need = self._cost / (self.max_share * self._step)  # steps between samples
        stride = self.every * min(max(1, math.ceil(need / self.every)), _MAX_STRETCH)
        if stride != self.stride:
            log = logger.info if self.stride == self.every else logger.debug
            log(
                "lossforecast: probing every %d steps (a probe step takes %.2g ms, a training "
                "step %.2g ms; probing is kept under %.0f%% of the time).",
                stride,
                1e3 * self._cost,
                1e3 * self._step,
                100 * self.max_share,
            )
            self.stride = stride


class Probes:
    """Instability probes of a torch model, sampled every ``every_n_steps`` optimizer steps.

    Call :meth:`before_optimizer_step` after ``backward()`` (with unscaled gradients) and
    :meth:`after_optimizer_step` after ``optimizer.step()``; the latter returns the metrics
    on sampled steps (names in the module docstring), else None. Pass them to
    ``InstabilityDetector.observe_metrics``. Nothing here ever raises into training: a
    failing probe is logged once and turned off.

    Parameters
    ----------
    model : nn.Module
        The model.
    optimizer : torch.optim.Optimizer, optional
        Its optimizer (for the Adam ε probe; Adam-family states with ``exp_avg_sq``).
    every_n_steps : int, optional
        Sampling cadence: steps ``s`` with ``s % every_n_steps == 0``. Default 20.
    lm_head : str, nn.Module or False, optional
        The module whose output is the logits. By default the model's
        ``get_output_embeddings()`` (Hugging Face), else the last ``nn.Linear`` with
        ``out_features == config.vocab_size``, else the last ``nn.Linear`` outside attention
        layers. ``False`` turns the output probe off.
    max_rows : int, optional
        Sequences of the batch the attention and output logits are measured on. Default 8.
    update_sample : int, optional
        Entries per parameter tensor behind ``update_ratio`` (a strided sample, so the
        snapshot costs at most this much memory per tensor). Default 4096.
    per_layer : bool, optional
        Also report per-layer values. Default True.
    max_overhead : float, optional
        Keep the probes' time under this share of the training time by sampling every
        ``k * every_n_steps`` steps instead, with the smallest whole ``k`` (up to 50) that
        does, measured as the run goes (:attr:`cadence`). The callbacks and ``Monitor`` use
        0.01. Default None: always every ``every_n_steps``.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> probes = Probes(model, opt, every_n_steps=2).attach()
    >>> for step in range(3):
    ...     model(torch.randn(5, 4)).logsumexp(-1).mean().backward()
    ...     probes.before_optimizer_step(step)
    ...     opt.step(); opt.zero_grad()
    ...     metrics = probes.after_optimizer_step(step)
    ...     print(step, metrics is not None)
    0 True
    1 False
    2 True
    >>> sorted(k for k in metrics if "/" not in k)[:3]
    ['adam_v_below_eps_frac', 'adam_v_rms_over_eps', 'grad_norm']
    >>> probes.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every_n_steps: int = 20,
        lm_head: str | nn.Module | bool | None = None,
        max_rows: int = 8,
        update_sample: int = 4096,
        per_layer: bool = True,
        max_overhead: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch nn.Module, got {type(model).__name__}.")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"`optimizer` must be a torch optimizer, got {type(optimizer).__name__}."
            )
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("max_rows", max_rows),
            ("update_sample", update_sample),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if max_overhead is not None and not (
            isinstance(max_overhead, (int, float)) and 0.0 < max_overhead < 1.0
        ):
            raise ValueError(f"`max_overhead` must be in (0, 1) or None, got {max_overhead!r}.")
        if not (lm_head is None or lm_head is False or isinstance(lm_head, (str, nn.Module))):
            raise TypeError(f"`lm_head` must be a module name, a module or False, got {lm_head!r}.")
        if isinstance(lm_head, str) and lm_head not in dict(model.named_modules()):
            raise ValueError(f"`lm_head` {lm_head!r} is not a module of the model.")
        self.model = model
        self.optimizer = optimizer
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.update_sample = update_sample
        self.per_layer = bool(per_layer)
        self.max_overhead = max_overhead
        self._budget = _CostBudget(every_n_steps, max_overhead)
        self._lm_head_arg = lm_head
        self._handles: list[Any] = []
        self._layers: dict[nn.Module, str] = {}
        self._armed = True  # the first step is always sampled
        self._attn: dict[str, torch.Tensor] = {}
        self._out: dict[str, torch.Tensor] | None = None
        self._pending: list[_Reading] = []  # gradient norms, read with the rest of the step
        self._snapshot: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._off: set[str] = set()
        self.lm_head: nn.Module | None = None
        self.attention_layers: list[str] = []

    # ------------------------------------------------------------------ attach
    def attach(self) -> Probes:
        """Register the hooks (idempotent); returns ``self``."""
        if self._handles:
            return self
        names = {m: n for n, m in self.model.named_modules()}
        for module, name in names.items():
            _ATTACHED[module] = self
            recipe = _recipe(module)
            if recipe is None:
                continue
            self._layers[module] = f"layer{len(self.attention_layers)}"
            self.attention_layers.append(name)
            hook = self._attention_hook(recipe)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        self.lm_head = self._find_lm_head(names)
        if self.lm_head is not None:
            self._handles.append(self.lm_head.register_forward_hook(self._output_hook))
        self._handles.append(_Detach(self))
        return self

    def detach(self) -> None:
        """Remove every hook; the model is as before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Probes:
        return self.attach()

    def __exit__(self, *exc_info: Any) -> None:
        self.detach()

    def _find_lm_head(self, names: dict[nn.Module, str]) -> nn.Module | None:
        arg = self._lm_head_arg
        if arg is False:
            return None
        if isinstance(arg, nn.Module):
            return arg
        if isinstance(arg, str):
            return dict(self.model.named_modules())[arg]
        get = getattr(self.model, "get_output_embeddings", None)
        with contextlib.suppress(Exception):
            head = get() if callable(get) else None
            if isinstance(head, nn.Module):
                return head
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        inside = {
            sub for m in self._layers for sub in m.modules()
        }  # projections of attention layers are not heads
        linears = [m for m in names if isinstance(m, nn.Linear) and m not in inside]
        if vocab is not None:
            match = [m for m in linears if m.out_features == vocab]
            if match:
                return match[-1]
        return linears[-1] if linears else None

    # ------------------------------------------------------------------ forward side
    def _collecting(self, module: nn.Module) -> bool:
        return (
            self._armed
            and "attention" not in self._off
            and module.training
            and torch.is_grad_enabled()
            and self._layer(module) not in self._attn
        )

    def _layer(self, module: nn.Module) -> str:
        name = self._layers.get(module)
        if name is None:  # a hand-written layer seen through observe_attention
            name = self._layers[module] = f"layer{len(self._layers)}"
        return name

    def _record_attention(self, module: nn.Module, q, k, scale) -> None:
        self._attn[self._layer(module)] = _max_logit(q, k, scale, self.max_rows)

    def _attention_hook(self, recipe: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._collecting(module):
                return
            with self._budget.timing(), torch.no_grad():
                qk = self._guard("attention", recipe, module, args, kwargs)
                if qk is not None:
                    self._guard("attention", self._record_attention, module, *qk)

        return hook

    def _output_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if (
            not self._armed
            or self._out is not None
            or "output" in self._off
            or not module.training
            or not torch.is_grad_enabled()
        ):
            return
        with self._budget.timing():
            self._guard("output", self._record_output, output)

    def _record_output(self, output: Any) -> None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        with torch.no_grad():
            x = logits.detach()[: self.max_rows].float()
            self._out = {
                "output_logsumexp": torch.logsumexp(x, dim=-1).mean(),
                "output_logit_max": x.amax(),
            }

    # ------------------------------------------------------------------ optimizer side
    @property
    def cadence(self) -> int:
        """Steps between samples now: ``every_n_steps``, stretched by ``max_overhead``."""
        return self._budget.stride

    def is_sampled(self, step: int) -> bool:
        """Whether ``step`` is sampled."""
        return step % self._budget.stride == 0

    def before_optimizer_step(self, step: int, *, grad_scale: float | None = None) -> None:
        """Read gradients (and snapshot parameters for the update ratio) on sampled steps.

        Call after ``backward()`` and gradient unscaling, before ``optimizer.step()``.
        ``grad_scale`` divides the gradient norms when the gradients are still scaled.
        """
        self._pending = []
        self._snapshot = []
        if self.is_sampled(step):
            with self._budget.timing():
                self._guard("gradients", self._read_grads, grad_scale)
                self._guard("update", self._take_snapshot)

    def after_optimizer_step(self, step: int) -> dict[str, float] | None:
        """Metrics of sampled step ``step`` (None otherwise); arms the next sampled step.

        Every probe of the step stays on the device until here, where all are read back
        in one transfer: a sampled step costs the GPU one synchronisation, not one per probe.
        """
        sampled = self.is_sampled(step)
        try:
            if not sampled:
                return None
            pending = list(self._pending)
            if self._attn:
                pending.append(self._attention_reading())
            if self._out:
                names, values = list(self._out), list(self._out.values())
                pending.append((values, lambda v: dict(zip(names, v, strict=True))))
            with self._budget.timing():
                for part, read in (("params", self._read_params), ("adam", self._read_adam)):
                    reading = self._guard(part, read)
                    if reading is not None:
                        pending.append(reading)
            return self._guard("read", _resolve, pending) or {}
        finally:
            self._budget.step_done(step, sampled)
            self._armed = self.is_sampled(step + 1)
            self._attn, self._out, self._pending, self._snapshot = {}, None, [], []

    def _named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def _attention_reading(self) -> _Reading:
        layers = list(self._attn)

        def finish(values: list[float]) -> dict[str, float]:
            out = {"attn_logit_max": max(values)}
            if self.per_layer:
                out.update({f"attn_logit_max/{k}": v for k, v in zip(layers, values, strict=True)})
            return out

        return list(self._attn.values()), finish

    def _read_grads(self, grad_scale: float | None) -> None:
        named = [(n, p.grad) for n, p in self._named_params() if p.grad is not None]
        if not named:
            return
        divisor = float(grad_scale) if grad_scale else 1.0
        groups = [_group(n) for n, _ in named]

        def finish(values: list[float]) -> dict[str, float]:
            norms = [v / divisor for v in values]
            total, per = _combine(norms, groups)
            out = {"grad_norm": total, "nonfinite_grads": float(_n_nonfinite(norms))}
            if self.per_layer:
                out.update({f"grad_norm/{g}": v for g, v in per.items()})
            return out

        self._pending.append((_norms([g for _, g in named]), finish))

    def _take_snapshot(self) -> None:
        n = self.update_sample
        named = list(self._named_params())
        copies = _copies([_sample(p, n) for _, p in named])
        self._snapshot = [
            (_group(name), p, copy) for (name, p), copy in zip(named, copies, strict=True)
        ]

    def _read_params(self) -> _Reading:
        norms = _norms([p for _, p in self._named_params()])
        snapshot, n = self._snapshot, self.update_sample
        befores = [before for _, _, before in snapshot]
        deltas = _norms(_differences([_sample(p, n) for _, p, _ in snapshot], befores))
        bases = _norms(befores)
        groups = [g for g, _, _ in snapshot]
        k, m = len(norms), len(deltas)

        def finish(values: list[float]) -> dict[str, float]:
            out = {
                "param_norm": _combine(values[:k], ["all"] * k)[0],
                "nonfinite_params": float(_n_nonfinite(values[:k])),
            }
            if snapshot:
                (dt, dper), (bt, bper) = (
                    _combine(values[k : k + m], groups),
                    _combine(values[k + m :], groups),
                )
                out["update_ratio"] = dt / bt if bt > 0 else math.inf
                if self.per_layer:
                    out.update(
                        {f"update_ratio/{g}": dper[g] / bper[g] for g in dper if bper[g] > 0}
                    )
            return out

        return norms + deltas + bases, finish

    def _read_adam(self) -> _Reading | None:
        opt = self.optimizer
        if opt is None:
            return None
        vs, scales = [], []  # v and 1 / (bias correction · ε²), per tensor
        below, sampled = [], 0  # entries of v̂ below ε², counted on the strided samples
        for group in opt.param_groups:
            eps, betas = group.get("eps"), group.get("betas")
            if not eps or betas is None:
                continue
            correction, samples = None, []
            for p in group["params"]:
                v = (opt.state.get(p) or {}).get("exp_avg_sq")
                if v is None or not v.numel():
                    continue
                if correction is None:  # one step count per group (it may live on the GPU)
                    t = float(opt.state[p].get("step", 1))
                    correction = max(1.0 - betas[1] ** max(t, 1.0), 1e-30)
                vs.append(v.detach())
                scales.append(1.0 / (correction * eps**2))
                samples.append(_sample(v, self.update_sample))
            if samples:
                below.append((torch.cat(samples) < eps**2 * correction).sum())
                sampled += sum(x.numel() for x in samples)
        count = sum(v.numel() for v in vs)
        if not count:
            return None
        sums = _norms(vs, 1)  # v >= 0: its L1 norm is its sum

        def finish(values: list[float]) -> dict[str, float]:
            total = sum(x * c for x, c in zip(values[: len(vs)], scales, strict=True))
            return {
                "adam_v_rms_over_eps": math.sqrt(total / count),
                "adam_v_below_eps_frac": sum(values[len(vs) :]) / sampled,
            }

        return sums + below, finish

    # ------------------------------------------------------------------ safety
    def _guard(self, part: str, fn: Callable, *args: Any) -> Any:
        """Run ``fn``; on error log once, turn ``part`` off and return None."""
        if part in self._off:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self._off.add(part)
            logger.warning(
                "lossforecast: the %s probe failed (%s: %s); it is off for this run.",
                part,
                type(exc).__name__,
                exc,
            )
            return None

    def __repr__(self) -> str:
        return (
            f"Probes(every_n_steps={self.every_n_steps}, attention_layers="
            f"{len(self.attention_layers)}, lm_head={self.lm_head is not None})"
        )


class _Detach:
    """Handle that unregisters a Probes' modules from :func:`observe_attention`."""

    def __init__(self, probes: Probes) -> None:
        self.probes = probes

    def remove(self) -> None:
        for module in list(_ATTACHED):
            if _ATTACHED.get(module) is self.probes:
                del _ATTACHED[module]
