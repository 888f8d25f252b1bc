"""Run time of a split-NN job before it starts (``vfl estimate``): §4.9 counts × measured costs.

Three modules, in the order the estimate uses them:

* :mod:`vfl.estimate.measure`: the primitives of one step (and of the PSI) timed in this
  process (:class:`~vfl.estimate.measure.PrimitiveCosts`);
* :mod:`vfl.estimate.costmodel`: the floor, per-step operation counts times those costs;
* :mod:`vfl.estimate.job`: the job's run time, phase by phase, and its printed summary.

It imports :mod:`vfl.splitnn` (it estimates split-NN jobs); no mode imports it.
"""
