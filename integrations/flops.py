"""FLOPs of a training step, counted once on a real batch with torch's FlopCounterMode.

The torch side of lossforecast's compute figures: :func:`count_flops` gives the FLOPs per
step that :class:`~lossforecast._compute.ComputeMeter` turns into FLOP/s and MFU, and
:func:`device_peak_flops` looks the device up in the peak table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lossforecast._compute import peak_flops

try:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
except ImportError:  # pragma: no cover - depends on what is installed
    torch = None

__all__ = ["FlopCount", "count_flops", "estimate_flops", "device_peak_flops", "cuda_device_ids"]

logger = logging.getLogger(__name__)

_INSTALL = 'lossforecast.integrations.flops needs torch: pip install "lossforecast[lightning]"'


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward + backward pass on a batch.

    Attributes
    ----------
    flops : float
        Forward plus backward FLOPs (a multiply-add counts 2).
    forward, backward : float
        The two parts.
    method : {'counted', 'estimate'}
        ``'counted'`` by ``torch.utils.flop_counter.FlopCounterMode``; ``'estimate'`` from
        the parameter count (:func:`estimate_flops`).
    tokens : int or None
        Tokens in the batch, when they could be told (the ``input_ids`` or first integer
        tensor of the batch).
    n_params : int
        Trainable parameters outside embedding tables.
    note : str
        How the figure was made (for an estimate, that it is one and why).
    """

    flops: float
    forward: float
    backward: float
    method: str
    tokens: int | None
    n_params: int
    note: str

    @property
    def flops_per_token(self) -> float | None:
        """``flops / tokens`` (None without a token count)."""
        return self.flops / self.tokens if self.tokens else None


def estimate_flops(
    n_params: int,
    tokens: int,
    *,
    n_layers: int | None = None,
    seq_len: int | None = None,
    d_model: int | None = None,
) -> FlopCount:
    """Training FLOPs of a transformer from its size: ``6·N·D`` plus the attention term.

    ``6·N`` per token for the weight matmuls (2 forward, 4 backward; Kaplan et al. 2020,
    Table 1), plus ``12·L·seq·d`` per token for attention's score and value matmuls when the
    layer count, sequence length and width are all given (PaLM, Chowdhery et al. 2022,
    Appendix B: ``6N + 12LHQT``, with ``H·Q = d``).

    Parameters
    ----------
    n_params : int
        Non-embedding parameters ``N``, >= 1.
    tokens : int
        Tokens ``D`` in the batch, >= 1.
    n_layers, seq_len, d_model : int, optional
        Layers ``L``, sequence length and model width ``d`` for the attention term.

    Returns
    -------
    FlopCount
        ``method='estimate'``; forward is a third of the total.

    Raises
    ------
    ValueError
        If ``n_params`` or ``tokens`` is not a positive int.

    References
    ----------
    Kaplan et al. (2020), "Scaling Laws for Neural Language Models", arXiv:2001.08361.
    Chowdhery et al. (2022), "PaLM: Scaling Language Modeling with Pathways",
    arXiv:2204.02311, Appendix B.

    Examples
    --------
    >>> estimate_flops(1_000_000, 2048).flops
    12288000000.0
    >>> estimate_flops(1_000_000, 2048, n_layers=2, seq_len=64, d_model=128).flops
    12690653184.0
    """
    for name, value in (("n_params", n_params), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    per_token = 6.0 * n_params
    note = "estimate: 6*N*D (Kaplan et al. 2020)"
    if n_layers and seq_len and d_model:
        per_token += 12.0 * n_layers * seq_len * d_model
        note += " + attention 12*L*seq*d per token (PaLM, App. B)"
    else:
        note += "; attention term left out (layers, sequence length or width unknown)"
    total = per_token * tokens
    return FlopCount(total, total / 3, 2 * total / 3, "estimate", tokens, n_params, note + ".")


def count_flops(model: Any, *args: Any, **kwargs: Any) -> FlopCount:
    """Count the FLOPs of one training step: ``model(*args, **kwargs)`` and its backward.

    Runs the forward and backward passes once under
    ``torch.utils.flop_counter.FlopCounterMode`` in the model's current train/eval mode,
    and leaves the training state as it was: every parameter's ``.grad`` (and the buffers,
    such as BatchNorm statistics, and the CPU/CUDA random state) is restored, and no
    optimizer steps. The loss is the output if it is a scalar, else its ``.loss`` or
    ``["loss"]``, else the sum of the output (the backward costs the same). A
    ``DistributedDataParallel`` wrapper is looked through, so no gradients are all-reduced.

    When counting fails (or sees no matmul, as with kernels the counter does not know), it
    falls back to :func:`estimate_flops` with the parameter count, the batch's tokens and,
    when found, the layer count and width (``model.config`` of Hugging Face models, or the
    ``nn.MultiheadAttention`` layers), and says so in ``note``.

    Parameters
    ----------
    model : torch.nn.Module
        The model as the training step calls it.
    *args, **kwargs
        A real batch, passed to the model as is.

    Returns
    -------
    FlopCount
        Per call: multiply by the micro-batches per optimizer step under gradient
        accumulation. Model FLOPs (the standard for MFU) unless activation checkpointing
        recomputes the forward, which is then counted too.

    Raises
    ------
    RuntimeError
        If counting fails and no token count can be found in the batch to estimate from.
    ImportError
        If torch is not installed.
    """
    if torch is None:
        raise ImportError(_INSTALL)
    module = _unwrap(model)
    tokens, seq_len = _batch_tokens(args, kwargs)
    n_params = _non_embedding_params(module)
    try:
        forward, total = _count(module, args, kwargs)
        if total > 0:
            note = "counted with torch.utils.flop_counter.FlopCounterMode on one batch."
            return FlopCount(
                float(total), float(forward), float(total - forward), "counted", tokens,
                n_params, note,
            )  # fmt: skip
        reason = "the counter saw no matmul or convolution"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if tokens is None or n_params < 1:
        raise RuntimeError(
            f"could not count FLOPs ({reason}), and the batch has no token count to "
            "estimate them from."
        )
    n_layers, d_model = _layers_and_width(module)
    estimate = estimate_flops(n_params, tokens, n_layers=n_layers, seq_len=seq_len, d_model=d_model)
    logger.info("lossforecast: FLOPs not counted (%s); using an estimate.", reason)
    return replace(estimate, note=f"{estimate.note} Counting failed: {reason}.")


def _count(module: Any, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one pass; training state restored."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        for p in params:
            p.grad = None
        counter = FlopCounterMode(display=False)
        with torch.enable_grad(), counter:
            out = module(*args, **kwargs)
            forward = counter.get_total_flops()
            _loss_of(out).backward()
        return forward, counter.get_total_flops()
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _loss_of(out: Any) -> Any:
    """The scalar to call ``backward`` on, from a model's output."""
    if isinstance(out, torch.Tensor):
        return out if out.numel() == 1 else out.float().sum()
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return _loss_of(loss)
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor) and item.requires_grad:
                return _loss_of(item)
    raise TypeError(f"cannot find a loss in the model's output of type {type(out).__name__}.")


def _tensors(args: tuple, kwargs: dict) -> Iterator[Any]:
    """Tensors of a batch: ``input_ids`` first, then the arguments in order (one level deep)."""
    if isinstance(kwargs.get("input_ids"), torch.Tensor):
        yield kwargs["input_ids"]
    for value in (*args, *kwargs.values()):
        items = value.values() if isinstance(value, Mapping) else [value]
        if isinstance(value, Mapping) and isinstance(value.get("input_ids"), torch.Tensor):
            yield value["input_ids"]
        for item in items:
            if isinstance(item, torch.Tensor):
                yield item


def _batch_tokens(args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    """(tokens, sequence length) of a batch: its first integer tensor of shape (batch, seq)."""
    for t in _tensors(args, kwargs):
        if t.ndim >= 2 and not t.is_floating_point() and not t.is_complex():
            return int(t.shape[0] * t.shape[1]), int(t.shape[1])
    return None, None


def _non_embedding_params(module: Any) -> int:
    """Trainable parameters outside ``nn.Embedding`` tables (Kaplan et al.'s ``N``)."""
    embedding = {
        id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    return sum(p.numel() for p in module.parameters() if p.requires_grad and id(p) not in embedding)


def _layers_and_width(module: Any) -> tuple[int | None, int | None]:
    """(layers, width) from a Hugging Face config, else from ``nn.MultiheadAttention`` layers."""
    config = getattr(module, "config", None)
    if config is not None:
        layers = _first_attr(config, ("num_hidden_layers", "n_layer", "num_layers"))
        width = _first_attr(config, ("hidden_size", "n_embd", "d_model"))
        if layers and width:
            return int(layers), int(width)
    attention = [m for m in module.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    if attention:
        return len(attention), int(attention[0].embed_dim)
    return None, None


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _unwrap(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _device(device: Any) -> Any:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def device_peak_flops(device: Any, dtype: Any = None, *, peak: float | None = None) -> float | None:
    """Peak dense FLOP/s of a torch device for a dtype, from the datasheet table.

    Parameters
    ----------
    device : torch.device, str or int
        The training device (``"cuda:0"``, an index, ``torch.device``).
    dtype : torch.dtype or str, optional
        The compute dtype: ``torch.bfloat16`` (default), ``torch.float16``,
        ``torch.float32`` (counted as TF32 when ``torch.backends.cuda.matmul.allow_tf32``
        is on) or a table name such as ``"tf32"``.
    peak : float, optional
        Your own figure, returned as is (for devices not in the table, or CPUs).

    Returns
    -------
    float or None
        None on a CPU or a device not in the table, unless ``peak`` is given.

    Examples
    --------
    >>> device_peak_flops("cpu") is None, device_peak_flops("cpu", peak=1e12)
    (True, 1000000000000.0)
    """
    if torch is None:
        raise ImportError(_INSTALL)
    if peak is not None:
        if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not peak > 0:
            raise ValueError(f"`peak` must be a positive number, got {peak!r}.")
        return float(peak)
    dev = _device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    if dtype is None:
        dtype = torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype == torch.float32:
            dtype = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
        else:
            dtype = str(dtype)
    try:
        return peak_flops(torch.cuda.get_device_name(dev), dtype)
    except ValueError:
        return None


def cuda_device_ids(device: Any) -> list[int | str]:
    """What to pass as ``cuda_devices`` to ``open_energy_monitor`` for a torch device.

    The GPU's UUID (exact whatever ``CUDA_DEVICE_ORDER`` says) when torch reports it, else
    its index; ``[]`` for a CPU device (no GPU: the monitor falls back to RAPL).

    Examples
    --------
    >>> cuda_device_ids("cpu")
    []
    """
    if torch is None:
        raise ImportError(_INSTALL)
    dev = _device(device)
    if dev.type != "cuda":
        return []
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid:
        text = str(uuid)
        return [text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"]
    return [index]
