"""The experiment suite: tasks (data, model, metric), one training loop, reports and the
``spherical-losses`` command line."""
