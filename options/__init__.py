"""Command-line options: ``BaseOptions`` shared flags, ``TrainOptions`` and ``TestOptions``."""
