"""Reproduce the README's headline table: the default evaluation grid, printed as Markdown.

    python examples/reproduce_headline.py                 # the README main job (CPU-sized)
    python examples/reproduce_headline.py --config gsm8k-grid --device cuda

The same as ``hf-globalres-eval [--config ...]``, through the Python API: results go to
eval/reports/<run name>/ (JSON, CSV, plots, report.md) and a rerun resumes.
"""

from __future__ import annotations

import argparse

from hf_globalres.eval import cli, report, runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="config name (hf_globalres/eval/configs) or a path")
    parser.add_argument("--device", help="auto, cpu, cuda, ...")
    args = parser.parse_args()

    config = cli.config_from_args(cli.build_parser().parse_args(["--config", args.config]))
    if args.device:
        config.device = args.device
    records = runner.run(config)
    summary = report.write_report(config, runner.select(records, config))
    print(report.format_table(summary["rows"], markdown=True))
    if summary["findings"]:
        print()
        print(report.format_findings(summary["findings"]))


if __name__ == "__main__":
    main()
