"""A run, from its settings to its record: the parts of the one run path, in the order a run crosses them.

- :mod:`~helpers.run.recipe`: every setting, declared once, with its default rule and check (:class:`Recipe`);
- :mod:`~helpers.run.folder`: may a folder take results, what an earlier run there means (:func:`decide`);
- :mod:`~helpers.run.record`: ``run.json`` (:class:`RunRecord`) and the typed view of finished runs (:class:`Run`);
- :mod:`~helpers.run.bundle`: finished runs in a small zip to share, read back as runs (``export-runs``);
- :mod:`~helpers.run.training`: ``Trainer`` with the recipe's settings; :mod:`~helpers.run.callbacks` what it writes
  as it goes; :mod:`~helpers.run.artifacts` what a method trained, and the way back to a model;
- :mod:`~helpers.run.evaluation`: generation, metrics, perplexity; :mod:`~helpers.run.memory`: memory probes;
- :mod:`~helpers.run.pipeline`: the path itself, for the command line, ``compare`` and the benchmarks.
"""
