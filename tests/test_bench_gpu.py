"""scripts/bench_gpu.py at tiny sizes on the CPU (``--smoke``): every section runs, the loss table's
implementations agree, and the script loads none of hf_kd's Hub or data-loading code (it must run on a
GPU machine with older Hub libraries)."""

import re

from processes import launch, python

RUN = """
import runpy, sys
sys.argv = ["scripts/bench_gpu.py", "--smoke", "--repeats", "1"]
runpy.run_path("scripts/bench_gpu.py", run_name="__main__")
print("LOADED", sorted(m for m in sys.modules if m.startswith(("hf_kd.hub", "hf_kd.data.loading", "hf_kd.runs"))))
"""


def test_smoke_run_prints_every_section_with_agreeing_losses():
    out = launch([*python(), "-c", RUN], timeout=600).stdout
    for title in ("## 1. LM loss", "## 2. online KD step", "## 3. cached KD step", "## 4. against TRL"):
        assert title in out
    rows = re.findall(r"\| 64 \| (\w+) \|.*\| dense ([\d.]+), hf_kd ([\d.]+), head ([\d.]+) \|", out)
    assert [name for name, *_ in rows] == ["jsd", "forward_kl"]
    for _, *values in rows:
        dense, chunked, head = map(float, values)
        assert dense > 0 and abs(chunked - dense) <= 1e-5 * dense and abs(head - dense) <= 1e-5 * dense
    ratio = re.search(r"^c / \(a \+ b\) = ([\d.]+)", out, re.M)
    assert ratio and float(ratio.group(1)) > 0
    assert re.search(r"cached / plain = [\d.]+", out)
    assert "LOADED []" in out
