"""One module per pipeline stage (the same name in dvc.yaml, params.yaml and Prefect).

Each module exposes `run(params, root)` doing the work over files, and a tiny `main()`.
"""

STAGES = ("ingest", "clean", "validate", "split", "augment", "featurize", "train", "evaluate", "package")
