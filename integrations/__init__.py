"""Framework adapters (Lightning, Hugging Face), installed as ``lossforecast.integrations``.

Each submodule imports its framework only when it is imported itself, so ``import lossforecast``
stays cheap and torch-free.
"""
