"""The tools built on the library core; nothing in the core imports them (tests/unit/test_architecture.py).

- :mod:`~mythos.tools.plan` (``mythos-plan``): matched-tokens / matched-compute run plans.
- :mod:`~mythos.tools.runs`: a finished run directory read for comparison (metrics, data and
  budget checks, segments); :mod:`~mythos.tools.compare` (``mythos-compare``): two runs side by side.
- :mod:`~mythos.tools.experiment_report` (``mythos-experiment-report``) with its LM half
  (:mod:`~mythos.tools.experiment_lm`), chain-task half (:mod:`~mythos.tools.experiment_multihop`)
  and plots (:mod:`~mythos.tools.experiment_plots`).
- :mod:`~mythos.tools.export` (``mythos-export``): consolidated weights, ``--hf-llama``, ``--hf``
  (:mod:`mythos.tools.hf`: the remote-code model, its writer, the tokenizer converter).
- :mod:`~mythos.tools.flops_table` (``mythos-accounting``): the parameter / FLOPs table.
"""
