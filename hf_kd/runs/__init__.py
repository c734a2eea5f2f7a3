"""The orchestration layer: everything that loads models and datasets: one run, a cache capture, a
report build, an ablation. It sits above ``hf_kd.trainer``; nothing below imports it."""
