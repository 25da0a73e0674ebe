"""Trainer integrations of :class:`normscope.Monitor`, each one line for the user.

* :class:`normscope.integrations.hf.NormscopeCallback`: a ``transformers.TrainerCallback``
  (``pip install 'normscope[hf]'``);
* :class:`normscope.integrations.lightning.NormscopeCallback`: a Lightning ``Callback``
  (``pip install 'normscope[lightning]'``; ``pytorch_lightning`` works too).

Each submodule imports its trainer library when imported; ``import normscope.integrations`` imports
nothing more. See docs/monitor.md, "Hugging Face Trainer" and "Lightning".
"""

__all__: list = []
