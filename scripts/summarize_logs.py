"""Print val/ppl from `python -m lit_prune validate` logs side by side: `python scripts/summarize_logs.py A.log B.log`."""

import re
import sys
from pathlib import Path

print(f"{'run':<20} {'val/ppl':>10}")
for log in sys.argv[1:]:
    match = re.findall(r"val/ppl\s*│\s*([0-9.]+)", Path(log).read_text())
    print(f"{Path(log).stem:<20} {float(match[-1]) if match else float('nan'):>10.2f}")
