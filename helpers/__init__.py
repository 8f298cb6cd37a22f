"""Helper package for *Interpretable Transformers*: one module per chapter topic.

Modules: ``common`` (seeds, device, cache, style), ``assets`` (offline loaders for every model and
data set), ``attention`` (chapter 1), ``sinr`` (chapter 2), ``interpretable_classifier`` (chapter 3),
``heads`` (chapter 4), ``ffn`` (chapter 5), ``dissect`` (chapter 6), ``attribution`` and
``evaluation`` (chapters 7 and 14), ``vision`` (chapter 8: the shared Fashion-MNIST ViT and CNN, saliency
faithfulness), ``prototypes`` (chapter 9), ``clip`` and ``choquet`` (chapter 10), ``rare``
(chapter 11), ``continual`` (chapter 12), ``transfer`` (chapter 13).
"""

__version__ = "0.1.0"
