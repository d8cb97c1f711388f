"""Bridges to other explainability tools (optional dependencies).

* :mod:`captum_vit.integrations.quantus`: an ``explain_func`` for Quantus metrics
  (``pip install captum-vit[quantus]``).
"""

__all__: list[str] = []
