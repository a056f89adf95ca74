"""Hugging Face export of every model kind (``mythos-export --hf``).

- :mod:`mythos.tools.hf.configuration_mythos`, :mod:`mythos.tools.hf.modeling_mythos`: the remote code that
  the export copies into its output directory. They import only ``torch`` and ``transformers``
  (never mythos: the directory must load where mythos is not installed; a test checks it).
- :mod:`mythos.tools.hf.export`: :func:`~mythos.tools.hf.export.to_hf`, the writer (no ``transformers``
  import needed to export).
"""
