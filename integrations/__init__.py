"""Framework adapters (Lightning, Hugging Face, plain PyTorch), installed as ``lossforecast.integrations``.

Each submodule imports its framework only when it is imported itself, so ``import lossforecast``
stays cheap and torch-free.
"""
