"""Final losses of past runs, read from run summaries or forecasts saved as JSON."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["read_reference_losses"]

logger = logging.getLogger(__name__)

_REFERENCE_KEYS = ("reached_loss", "final_loss")


def read_reference_losses(path: str | os.PathLike) -> list[float]:
    r"""Final losses of past runs from a JSON file or a folder of them; never raises.

    Each ``*.json`` / ``*.jsonl`` file (the folder's own files, not sub-folders or hidden
    files) holds one object, a list of objects, or one object per line. An object counts if
    it has a positive finite number at ``"reached_loss"`` (preferred: a loss actually
    reached, as in the end-of-training summary event) or ``"final_loss"``, at top level or
    under ``"data"`` (as :meth:`Event.to_dict` writes it). Run summaries written to a history
    folder (``{"kind": "lossforecast-run-summary", "version": 2, "final_loss": 2.93, ...}``)
    qualify. Unreadable files, unreadable lines of a JSON-lines file and files with no such
    number are skipped, and one log message says how many; a missing path gives an empty
    list and one message.

    Examples
    --------
    >>> import json, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.json").write_text(json.dumps({"final_loss": 2.93}))
    >>> _ = (folder / "b.jsonl").write_text('{"reached_loss": 2.88}\n{"final_loss": 3.1}\n')
    >>> read_reference_losses(folder)
    [2.93, 2.88, 3.1]
    """
    root = Path(path)
    if not root.exists():
        logger.warning("lossforecast: reference path %s does not exist; ignoring it.", root)
        return []
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            p
            for p in root.iterdir()
            if p.is_file() and p.suffix in (".json", ".jsonl") and not p.name.startswith(".")
        )
    losses: list[float] = []
    skipped: list[str] = []
    for file in files:
        try:
            found, bad = _losses_in(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            skipped.append(f"{file.name} ({type(exc).__name__})")
            continue
        if bad:
            skipped.append(f"{file.name} ({bad} unreadable line(s))")
        elif not found:
            skipped.append(f"{file.name} (no 'reached_loss' or 'final_loss')")
        losses.extend(found)
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        logger.warning(
            "lossforecast: skipped %d of %d reference file(s) in %s, wholly or in part: %s.",
            len(skipped),
            len(files),
            root,
            shown,
        )
    return losses


def _losses_in(text: str) -> tuple[list[float], int]:
    """Losses in a JSON document, a JSON list or JSON lines, and the unreadable lines.

    Raises ``ValueError`` if the text is neither JSON nor has a single readable JSON line.
    """
    try:
        docs, bad = [json.loads(text)], 0
    except json.JSONDecodeError:
        docs, bad = [], 0
        for line in text.splitlines():
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
        if not docs:
            raise ValueError("not JSON") from None
    items = [x for d in docs for x in (d if isinstance(d, list) else [d])]
    return [v for v in map(_loss_of, items) if v is not None], bad


def _loss_of(item: object) -> float | None:
    """The reached (else final) loss of one object, or None."""
    if not isinstance(item, Mapping):
        return None
    for where in (item, item.get("data")):
        if isinstance(where, Mapping):
            for key in _REFERENCE_KEYS:
                value = where.get(key)
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok and math.isfinite(value) and value > 0:
                    return float(value)
    return None
