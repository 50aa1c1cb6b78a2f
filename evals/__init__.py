"""The benchmarks behind eval.py: common.py (engine, results files, resume, scores), one module per
benchmark (babilong, ruler, longbench, gpqa, demo), sandbox.py (gpqa's code tool) and analyze.py
(the attention analysis). Adding a benchmark: docs/evaluation.md ("Adding a benchmark")."""
