"""HTML report pages of a BIDS Stats Model run, one per run, subject (session) and dataset node
instance (``chunkglm app``, unless ``--no-reports``).

Built with :mod:`chunkglm.report` (nilearn's report sections: model details, design matrix
and contrast weights, mask, the z maps thresholded as ``generate_report`` does by default,
plus the run's provenance), from the maps the nodes computed:

- a run: its design matrix, its contrasts' weights, its brain mask, every contrast's z map;
- a Subject/Session/Dataset node: one page per group of inputs (its GroupBy values but the
  contrast: ``sub-01``, or the whole dataset), its design (GLM nodes), every contrast's z map
  (fixed effects: nilearn's z of the fixed effects).

Pages go to ``OUTPUT_DIR/reports/node-<node>/<entities>_report.html`` and an index
``OUTPUT_DIR/reports/index.html`` links them.
"""

from __future__ import annotations

import html
from pathlib import Path

import nibabel as nib

from chunkglm.glm.stats_models.outputs import fitlins_label
from chunkglm.io.derivatives import StagedOutput
from chunkglm.report.build import Design, GLMPieces, glm_report
from chunkglm.report.descriptions import model_parameters
from chunkglm.report.sections import ReportOptions

__all__ = ["NodeReports"]

_KEYS = (("subject", "sub"), ("session", "ses"), ("task", "task"), ("run", "run"))


class NodeReports:
    """Collects each node's pages and writes them (atomically, with the index).

    Parameters
    ----------
    output_dir : Path
        The app's output folder (pages under ``reports/``).
    provenance : dict, optional
        Shown on every page (the app's options).
    """

    def __init__(self, output_dir, provenance=None):
        self.output_dir = Path(output_dir)
        self.provenance = provenance
        self.options = ReportOptions.checked()
        self.pages: dict[str, tuple[dict, GLMPieces]] = {}
        self.written: list[Path] = []

    def run(self, node_name, entities: dict, model, design, contrasts: dict, z_maps: dict, mask) -> None:
        """One run's page: ``contrasts`` ``{name: weights (rows, columns)}``, ``z_maps`` ``{name: image}``."""
        t_r = float(model.t_r) if getattr(model, "t_r", None) else None
        parameters = model_parameters(model, t_r) if t_r else {}
        label = _label(entities)
        pieces = GLMPieces("First Level Model", parameters, [Design(label or node_name, design)],
                           {name: [w] for name, w in contrasts.items()}, dict(z_maps),
                           mask_img=nib.load(mask) if isinstance(mask, str | Path) else mask,
                           provenance=self.provenance, subject=_entity(entities, "subject"),
                           entities={k: _entity(entities, k) for k in ("session", "task", "run")
                                     if _entity(entities, k) is not None})
        self._write(node_name, entities, pieces)

    def group(self, node_name, kind: str, entities: dict, design, contrast: str, weights, z_map,
              mask=None) -> None:
        """Add one contrast of a higher node's group to its page (written by :meth:`flush`);
        ``mask``: a GLM's analysis mask (fixed effects have none)."""
        key = f"{node_name}/{_label(entities)}"
        entities, pieces = self.pages.get(key, (entities, None))
        if pieces is None:
            glm = kind == "glm"
            pieces = GLMPieces("Second Level Model" if glm else "Fixed Effects", {},
                               [Design(_label(entities) or "all inputs", design)] if glm else [], {}, {},
                               inputs={} if glm else {"Node": node_name, "Model": "fixed effects of the inputs "
                                                      "(nilearn's compute_fixed_effects)", "Inputs": len(design)},
                               mask_img=mask, provenance=self.provenance, subject=_entity(entities, "subject"),
                               entities={k: _entity(entities, k) for k in ("session", "task")
                                         if _entity(entities, k) is not None})
            self.pages[key] = (dict(entities), pieces)
        pieces.contrasts[contrast] = [weights]
        pieces.stat_maps[contrast] = z_map

    def flush(self, node_name) -> None:
        """Write the pages of ``node_name``'s groups."""
        for key in [k for k in self.pages if k.split("/", 1)[0] == node_name]:
            entities, pieces = self.pages.pop(key)
            self._write(node_name, entities, pieces)

    def _write(self, node_name, entities, pieces) -> None:
        relative = f"reports/node-{fitlins_label(node_name, 'node')}/{_label(entities) or 'dataset'}_report.html"
        report = glm_report(pieces, self.options, title=f"node {node_name} · {pieces.label() or 'dataset'}")
        with StagedOutput(self.output_dir) as out:
            report.save_as_html(out.path(relative))
        self.written.append(self.output_dir / relative)

    def index(self) -> Path | None:
        """``reports/index.html`` linking every page written (None when there is none)."""
        if not self.written:
            return None
        items = "\n".join(f'<li><a href="{html.escape(p.relative_to(self.output_dir / "reports").as_posix())}">'
                          f"{html.escape(p.relative_to(self.output_dir / 'reports').as_posix())}</a></li>"
                          for p in self.written)
        page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>chunkglm app reports</title></head>"
                f"<body><h1>BIDS Stats Model reports</h1><ul>\n{items}\n</ul></body></html>\n")
        with StagedOutput(self.output_dir) as out:
            out.path("reports/index.html").write_text(page, encoding="utf-8")
        return self.output_dir / "reports" / "index.html"


def _entity(entities, key):
    value = entities.get(key)
    return None if value is None or isinstance(value, list | tuple | dict) or value != value else str(value)


def _label(entities: dict) -> str:
    """``sub-01_ses-2_task-x_run-1`` of the entities known (contrast left out)."""
    return "_".join(f"{short}-{_entity(entities, key)}" for key, short in _KEYS if _entity(entities, key) is not None)
