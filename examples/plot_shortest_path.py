r"""
The main job, small: decision-focused shortest paths
====================================================

``examples/shortest_path.py`` runs the PyEPO benchmark protocol: a linear model predicts the 40
edge costs of a 5×5 grid from 5 features, the decision is the shortest path under the predicted
costs (an LP), and each training method is scored by the normalized regret of that decision on
held-out data,

.. math::

    \frac{\sum_i c_i^\top x^\star(\hat c_i) - z^\star(c_i)}{\sum_i z^\star(c_i)},

lower is better (0 is the optimal path everywhere). This page runs the same script on a smaller
configuration (300 training points, 6 epochs, one seed) so that the docs build stays fast; the
figure is the one ``--plot`` writes. The full protocol and its numbers are on
:doc:`/lp_gradients`.

Runs in well under a minute on a CPU: ``python examples/plot_shortest_path.py`` (from the
repository root; it imports ``examples/shortest_path.py``).
"""

import shortest_path

# %%
# Train every method on a small configuration
# -------------------------------------------
# Two degrees of the true cost in the features: ``deg 1`` (linear, so the linear model is well
# specified) and ``deg 4`` (misspecified, where training through the decision should pay off).
# Each line is one run: method, degree, seed, its test regret and training time.

argv = ["--degrees", "1", "4", "--seeds", "0", "--train", "300", "--test", "500",
        "--epochs", "6"]
table = shortest_path.main(argv)

# %%
# The figure
# ----------
# Mean normalized test regret per method and degree. With one seed there are no error bars:
# the spread over seeds is not measured here (the full protocol uses five).

fig = shortest_path.figure(table, shortest_path.parser().parse_args(argv))
