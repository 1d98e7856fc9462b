"""The derivatives/glm layout of a BIDS Stats Model run (``chunkglm app --layout glm|both``).

Written from the maps the nodes computed (nothing is fitted twice), beside fitlins' ``node-*``
folders, with the names the rest of chunkglm writes:

- each Subject (or Session) node group -> ``first_level/sub-<s>/sub-<s>[_ses-<S>]_task-<t>_
  contrast-<C>_stat-{t|F,z,effect,variance}.nii.gz`` (the subject's fixed effects of its runs, as
  ``chunkglm first-level`` writes a subject over its runs) and one sidecar
  ``..._glm.json`` per subject (AnalysisLevel, Model: the node, its type; Contrasts; Software);
- the Dataset node of Type glm -> ``group_level/`` as
  :func:`chunkglm.interfaces.bids.save_group_derivatives` writes it (t|F and z maps, FDR and FWE
  corrected maps, permutation maps with ``--n-perm``, the design, the mask, ``group_glm.json``),
  one group model per contrast (the node's GroupBy) merged into that one folder: their contrasts
  are listed together in the sidecar. A model with several Dataset glm nodes (e.g. a one-sample
  test, an age covariate and a two-group comparison of the same subject maps) gets one folder
  per node, named as fitlins names its node folders: ``group_level/node-<node>/`` with the same
  files (each node its own design, mask and sidecar, which names the node). A group folder
  holds one design and one mask, so groups of one node whose designs or masks differ are refused
  with a one-line error (use ``--layout fitlins``).

``<C>`` is the contrast's name as :func:`chunkglm.io.derivatives.glm_label` makes it a label,
``<t>`` the groups' ``task`` entity (else the model's one Input task).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from chunkglm.errors import InputError
from chunkglm.glm.io.bids import save_group_derivatives
from chunkglm.glm.stats_models.outputs import fitlins_label
from chunkglm.io.derivatives import bids_filename, glm_label, software, write_json
from chunkglm.io.nifti import save_map

__all__ = ["LAYOUTS", "GlmLayout"]

#: ``--layout`` values: fitlins' node-* folders, the derivatives/glm layout, or both.
LAYOUTS = ("fitlins", "glm", "both")
#: nilearn's output key -> the glm layout's stat label (None: the test, t or F).
_STATS = {"stat": None, "z_score": "z", "effect_size": "effect", "effect_variance": "variance"}


class GlmLayout:
    """Collects a model run's subject and dataset maps into the derivatives/glm layout.

    Parameters
    ----------
    graph : bids.modeling.BIDSStatsModelsGraph
        The model (its Dataset nodes of Type glm name the group folders).
    alpha : float
        FDR q and FWE p of the group's corrected maps.
    two_sided : bool
        Two-sided corrections (and permutation test).
    permutation : dict, optional
        The permutation settings (``n_perm``, ``random_state``, ``two_sided_test``) when the
        dataset groups come with permutation maps.
    """

    def __init__(self, graph, *, alpha=0.05, two_sided=True, permutation=None):
        dataset_glm = [n.name for n in graph.nodes.values() if n.level == "dataset" and _kind(n) == "glm"]
        #: node name -> its group folder: group_level/ for one Dataset glm node, else one per node
        self.group_folders = ({name: "group_level" for name in dataset_glm} if len(dataset_glm) <= 1 else
                              {name: f"group_level/node-{fitlins_label(name, 'node')}" for name in dataset_glm})
        tasks = (graph.model.get("input") or {}).get("task") or []
        self.task = tasks[0] if isinstance(tasks, list) and len(tasks) == 1 else None
        self.alpha, self.two_sided, self.permutation = alpha, two_sided, permutation
        self._sidecars: dict[str, dict] = {}
        self._groups: dict[str, dict] = {}  # node name -> its design, mask and merged sidecar

    # -- first_level/ ----------------------------------------------------------------

    def subject(self, out, node, entities: dict, test: str, images: dict) -> None:
        """Stage one subject group's maps of one contrast (``images``: nilearn's output keys)."""
        names = self._subject_entities(node.name, entities)
        label = glm_label(entities["contrast"])
        base = f"first_level/sub-{names['sub']}"
        for key, stat in _STATS.items():
            save_map(images[key], out.path(f"{base}/" + bids_filename(
                {**names, "contrast": label, "stat": stat or test}, None, "nii.gz")))
        sidecar = f"{base}/" + bids_filename(names, "glm", "json")
        content = self._sidecars.setdefault(sidecar, {
            "AnalysisLevel": "first_level",
            "Model": {"Type": "FixedEffects" if _kind(node) == "meta" else "GLM", "Source": "BIDS Stats Model",
                      "Node": node.name, "Level": node.level},
            "Contrasts": {}, "Software": software()})
        content["Contrasts"][label] = {"Name": str(entities["contrast"]), "Type": test}
        write_json(out.path(sidecar), content)

    def _subject_entities(self, node_name, entities) -> dict:
        task = entities.get("task") if isinstance(entities.get("task"), str) else self.task
        if entities.get("subject") is None or task is None:
            raise InputError(f"--layout glm: node {node_name!r} gives maps without a subject or a single task "
                             f"({ {k: v for k, v in entities.items() if k != 'contrast'} }); the glm layout's "
                             "first_level/ names need both: use --layout fitlins.")
        session = entities.get("session")
        return {"sub": str(entities["subject"]), "ses": str(session) if isinstance(session, str | int) else None,
                "task": str(task)}

    # -- group_level/ ------------------------------------------------------------------

    def group(self, out, node, model, contrasts: dict, permutation_maps: dict | None = None) -> None:
        """Stage one dataset group: ``contrasts`` is ``{name: (weights, test)}`` over its design."""
        weights = {name: w for name, (w, _) in contrasts.items()}
        types = {name: test for name, (_, test) in contrasts.items()}
        settings = self.permutation if permutation_maps else None
        folder = self.group_folders.get(node.name, "group_level")
        with tempfile.TemporaryDirectory(prefix="chunkglm-glm-layout-") as scratch:
            save_group_derivatives(model, weights, scratch, contrast_types=types, alpha=self.alpha,
                                   two_sided=self.two_sided, permutation_maps=permutation_maps or None,
                                   permutation=settings)
            root = Path(scratch) / "group_level"
            sidecar = json.loads((root / "group_glm.json").read_text())
            state = self._check_same_group(node.name, root)
            for path in sorted(root.iterdir()):
                if path.name not in ("group_glm.json",):
                    out.path(f"{folder}/{path.name}").write_bytes(path.read_bytes())
        if len(self.group_folders) > 1:
            sidecar["Model"] = {**sidecar.get("Model", {}), "Node": node.name, "Source": "BIDS Stats Model"}
        state["sidecar"] = _merged(state.get("sidecar"), sidecar)
        write_json(out.path(f"{folder}/group_glm.json"), state["sidecar"])

    def _check_same_group(self, node_name, root: Path) -> dict:
        """The node's group state; refuses a group whose design or mask differs from the node's first."""
        design = pd.read_csv(root / "group_design-matrix.tsv", sep="\t")
        mask = np.asarray(nib.load(root / "group_mask.nii.gz").dataobj)
        state = self._groups.get(node_name)
        if state is None:
            self._groups[node_name] = state = {"design": design, "mask": mask}
            return state
        if not design.equals(state["design"]) or not np.array_equal(mask, state["mask"]):
            what = "design" if not design.equals(state["design"]) else "mask"
            raise InputError(f"--layout glm: the groups of node {node_name!r} have different {what}s; the glm "
                             "layout's group folder holds one design and one mask: use --layout fitlins "
                             "(its files for the groups done so far are written).")
        return state


def _merged(first: dict | None, other: dict) -> dict:
    """Two group sidecars of the same design as one: contrasts and thresholds together."""
    if first is None:
        return other
    merged = json.loads(json.dumps(first))
    merged["Contrasts"].update(other["Contrasts"])
    for key in ("FDR", "FWE"):
        merged["Corrections"][key]["Thresholds"].update(other["Corrections"][key]["Thresholds"])
        method = other["Corrections"][key].get("Method")
        if isinstance(method, dict):
            previous = merged["Corrections"][key].get("Method")
            merged["Corrections"][key]["Method"] = {**(previous if isinstance(previous, dict) else {}), **method}
        for extra in set(other["Corrections"][key]) - set(merged["Corrections"][key]):
            merged["Corrections"][key][extra] = other["Corrections"][key][extra]
    return merged


def _kind(node) -> str:
    return str(node.model.get("type", "glm")).lower()
