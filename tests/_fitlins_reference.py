"""Run fitlins 0.11 (the BIDS Stats Models anchor) inside .venv-fitlins, never imported by .venv.

Usage: ``.venv-fitlins/bin/python tests/_fitlins_reference.py BIDS_DIR OUT_DIR LEVEL [fitlins args]``.

This is fitlins' own command line (``fitlins.cli.run.run_fitlins``) with two changes that touch
no number it writes: the nipype workflow runs in this process (the "Linear" plugin instead of
MultiProc with one fresh process per node: ~150 nodes x 2 s of imports on the tiny test data),
and the figure nodes write empty files instead of matplotlib figures (the parity tests compare
the statistical maps, not figures; the figures took half of fitlins' time).
"""

import sys
from pathlib import Path

from fitlins.interfaces import visualizations
from nipype.pipeline import engine


def _in_process(run):
    def run_linear(self, plugin=None, plugin_args=None, updatehash=False):
        return run(self, plugin="Linear", plugin_args={}, updatehash=updatehash)
    return run_linear


def _empty_figure(self, runtime):
    out = Path(runtime.cwd) / (Path(self.inputs.data).name.split(".")[0] + "." + self.inputs.image_type)
    out.write_bytes(b"")
    self._results["figure"] = str(out)
    return runtime


def main(argv):
    engine.Workflow.run = _in_process(engine.Workflow.run)
    visualizations.Visualization._run_interface = _empty_figure
    from fitlins.cli.run import run_fitlins
    return run_fitlins(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
