"""Write docs/config.md from the config schema's field descriptions.

python scripts/gen_config_docs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelctl.config.reference import render_markdown  # noqa: E402

if __name__ == "__main__":
    out = ROOT / "docs" / "config.md"
    out.write_text(render_markdown())
    print(f"wrote {out}")
