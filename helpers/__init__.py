"""Helper package for *Interpretable Transformers*: one module per chapter topic.

Modules: ``common`` (seeds, device, cache, style), ``assets`` (offline loaders for every model and
data set), ``attention`` (chapter 1).
"""

__version__ = "0.1.0"
