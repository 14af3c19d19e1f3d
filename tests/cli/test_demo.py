"""cli/demo.py without the demo's extra (scikit-image): one line that says how to get it."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_without_scikit_image_is_one_line(tmp_path):
    code = (
        "import sys; sys.modules['skimage'] = None\n"  # as if scikit-image were not installed
        "from ilias_ray.cli.main import main\n"
        f"sys.exit(main(['demo', '--workdir', {str(tmp_path / 'demo')!r}]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        "ilias-ray: error: the demo needs scikit-image: pip install 'ilias-ray[demo]' (make demo installs it)"
    ]
