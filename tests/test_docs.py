"""The documentation stays true: the config reference is generated from the schema (and up to
date), every link in README.md and docs/ points at a file of this repository, and the training
path imports nothing heavy that a run does not use."""

from __future__ import annotations

import re
import subprocess
import sys

from accelctl.config.reference import render_markdown
from tests.conftest import ROOT

_LINK = re.compile(r"\]\(([^)]+)\)")


def test_the_config_reference_is_generated_from_the_current_schema():
    assert (ROOT / "docs" / "config.md").read_text() == render_markdown(), (
        "docs/config.md is out of date: run python scripts/gen_config_docs.py"
    )


def test_every_link_points_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in _LINK.findall(page.read_text()):
            assert "://" not in target, f"{page.name} links outside the repository: {target}"
            path = target.split("#")[0]
            if path:
                assert (page.parent / path).exists(), f"{page.name}: {target} does not exist"


def test_a_run_that_needs_none_of_them_imports_no_heavy_package(tmp_path):
    # tfds, TensorFlow, matplotlib, scikit-learn and orbax are imported where they are used:
    # a synthetic-data run without checkpoints or TensorBoard loads none of them.
    code = f"""
import sys
from accelctl import config
from accelctl.train import train
cfg = config.load_text('''
data: {{source: synthetic, shape: [8], num_train: 256, num_eval: 64, num_classes: 4,
       dtype: float32}}
train: {{batch_size: 32, steps: 4}}
checkpoint: {{enabled: false}}
output: {{tensorboard: false}}
''', 't')
train(cfg, run_dir={str(tmp_path / "run")!r}, quiet=True)
heavy = ('tensorflow_datasets', 'tensorflow', 'matplotlib', 'sklearn', 'orbax.checkpoint',
         'tensorboardX')
print(sorted(m for m in heavy if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
