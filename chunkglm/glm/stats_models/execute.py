"""Run a BIDS Stats Model node by node, as fitlins 0.11 does, on a cohort store.

- Run nodes: one :class:`~chunkglm.glm.first_level.FirstLevelModel` per run,
  on the run's store node, masked with the run's ``desc-brain_mask`` and
  fitted with the design pybids builds (:mod:`.design`). The fits are
  evaluated in waves (:func:`~chunkglm.glm.first_level.fitted_in_waves`:
  each chunk read once, a bounded number of runs in memory), and every
  contrast's effect, variance, t or F, z and p maps are written as each run
  is done (an F contrast's effect has one volume per row), with the run's design
  matrix (TSV), fitlins' three figures (design, regressor correlations, contrast
  weights; SVG) and its r-square and log-likelihood maps.
- ``"meta"`` nodes: fixed effects of their inputs' effects and variances with
  nilearn's ``compute_fixed_effects`` semantics (mask: nilearn's background mask
  of the effects; not precision-weighted), for every group and contrast of the
  node in one dask graph over voxel blocks (:mod:`.fixed_effects`), writing
  effect, variance and t, as fitlins with its ``"Meta"`` model type (fitlins
  0.11 compares the type with ``"Meta"``, so it runs a GLM for the
  specification's ``"meta"``).
- ``"glm"`` nodes above the run: nilearn's ``SecondLevelModel`` on each group's effect
  maps with pybids' design (mask: nilearn's background mask of the group's mean effect),
  every contrast's five maps, for every group and contrast of the node in one dask graph
  over voxel blocks (:mod:`.group_level`; ``--n-perm`` and ``--layout glm`` use a
  ``SecondLevelModel`` of each group on the maps staged for that graph).

A node reads its inputs' maps back from the files the node before it wrote: it stages
them into a scratch store, one map at a time, and its graph reads voxel blocks. The stores staged for
the workers lie in one temporary folder of the run inside ``scratch_dir`` (``chunkglm
app``: inside the cohort store's folder or URL, which the workers read), removed when the run ends
(or by the next run on the same host after a killed one). ``F`` contrasts are terminal (the
specification's rule): they are not handed to the next node.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
from bids.modeling.statsmodels import ContrastInfo

from chunkglm.errors import InputError
from chunkglm.glm.first_level import FirstLevelModel, fitted_in_waves
from chunkglm.glm.stats_models.design import run_design
from chunkglm.glm.stats_models.fixed_effects import FixedEffectsLevel
from chunkglm.glm.stats_models.group_level import GroupLevel
from chunkglm.glm.stats_models.spec import pybids_refusal
from chunkglm.glm.stats_models.outputs import (
    MAP_NAMES,
    design_path,
    figure_path,
    map_path,
    model_map_path,
    write_map,
)
from chunkglm.io.bids import bids_name, parse_entities
from chunkglm.io.derivatives import StagedOutput
from chunkglm.io.scratch import TemporaryFolder
from chunkglm.io.write_run import release_free_memory
from chunkglm.report.figures import (contrast_matrix_figure, design_matrix_correlation_figure,
                                     design_matrix_figure, save_figure)

__all__ = ["ANALYSIS_LEVELS", "ContrastMaps", "ModelRun"]

#: BIDS-Apps analysis level -> the last node level it runs.
ANALYSIS_LEVELS = {"run": "run", "session": "session", "participant": "subject", "dataset": "dataset"}
_RANK = {"run": 0, "session": 1, "subject": 2, "dataset": 3}
#: pybids' run-identifying entities (layout names).
_RUN_ENTITIES = ("subject", "session", "task", "acquisition", "ceagent", "reconstruction", "direction",
                 "run", "echo")
_NOT_ENTITIES = ("datatype", "desc", "suffix", "extension")
#: The run's temporary folder (in ``scratch_dir``): ``<prefix><host>-<pid>-<hex>``.
_SCRATCH_PREFIX = "chunkglm-app-"


@dataclass
class ContrastMaps:
    """The maps one node wrote for one contrast of one group.

    Attributes
    ----------
    entities : dict
        pybids' entities of the contrast (the node's GroupBy values and ``contrast``).
    test : str
        "t", "F" or "pass".
    files : dict
        Stat name ("effect", "variance", "t", "F", "z", "p") -> written path.
    """

    entities: dict
    test: str
    files: dict = field(default_factory=dict)


class ModelRun:
    """One BIDS Stats Model run over a cohort store, writing fitlins' derivatives.

    Parameters
    ----------
    graph : bids.modeling.BIDSStatsModelsGraph
        The model's graph, collections loaded (``graph.load_collections(...)``).
    cohort : chunkglm.io.cohort.Cohort
        The store holding every run of the graph (converted from the same folder).
    output_dir : Path
        A local folder (later nodes read the maps earlier ones wrote).
    space : str or None
        The runs' space (for finding their BOLD and mask files).
    desc : str
        The preprocessed BOLD files' ``desc`` label.
    chunk_bytes : int or None
        Memory budget of the first- and second-level models (None: their default, 64 MiB).
    permutation : chunkglm.glm.stats_models.inference.PermutationTest, optional
        Max-T permutation FWE maps for the t contrasts of the Dataset-level ``"glm"``
        nodes (a model without one run up to the dataset is refused).
    glm_layout : chunkglm.glm.stats_models.glm_layout.GlmLayout, optional
        Also write the subject and dataset maps in the derivatives/glm layout, under
        ``glm_dir``.
    glm_dir : Path, optional
        The derivatives/glm folder (default ``output_dir``).
    reports : chunkglm.glm.stats_models.reports.NodeReports, optional
        HTML pages of every run and node group, written as each node is done.
    progress : callable, optional
        Called with one line of text as each run or group is written.
    scratch_dir : str, Path or None
        The local folder or object-store URL in which the run makes its temporary folder of the
        stores it stages for the workers (the inputs and results of the nodes above the run),
        removed when :meth:`run` returns; default the temporary directory (``TMPDIR``). On a
        cluster of several machines, a folder they share, or a URL they reach.

    Attributes
    ----------
    written : list of Path
        fitlins' files written under ``output_dir``.
    glm_written : list of Path
        The derivatives/glm files written under ``glm_dir``.
    """

    def __init__(self, graph, cohort, output_dir, *, space=None, desc="preproc", chunk_bytes=None,
                 permutation=None, glm_layout=None, glm_dir=None, reports=None, progress=None, scratch_dir=None):
        self.graph = graph
        self.cohort = cohort
        self.output_dir = Path(output_dir)
        self.space = space
        self.desc = desc
        self.chunk_bytes = chunk_bytes
        self.permutation = permutation
        self.glm_layout = glm_layout
        self.glm_dir = Path(glm_dir) if glm_dir is not None else self.output_dir
        self.reports = reports
        self.progress = progress or (lambda text: None)
        self.scratch_dir = scratch_dir
        self._scratch = None
        self.written: list[Path] = []
        self.glm_written: list[Path] = []

    def run(self, analysis_level: str) -> list[Path]:
        """Run every node up to ``analysis_level`` ("run", "session", "participant" or "dataset")."""
        last = _RANK[ANALYSIS_LEVELS[analysis_level]]
        if self.permutation is not None:
            self._check_permuted_nodes(analysis_level)
        root = self.graph.root_node
        if root.level != "run":
            raise InputError(f"the model's first node ({root.name!r}) is at the {root.level!r} level; "
                             "chunkglm app fits images, so the first node must be at the Run level.")
        with pybids_refusal(f"node {root.name!r}"):
            specs = root.run(group_by=root.group_by, missing_values="ignore")
        if not specs:
            raise InputError("pybids found no run for this model (check --task, --space, "
                             "--participant-label and the model's Input).")
        self._scratch = TemporaryFolder(_SCRATCH_PREFIX, self.scratch_dir)
        try:
            outputs = self._run_level(root, specs)
            self._children(root, outputs, last)
        finally:
            self._scratch.cleanup()
            self._scratch = None
        return self.written

    def _check_permuted_nodes(self, analysis_level):
        if analysis_level != "dataset":
            raise InputError(f"--n-perm tests the Dataset nodes' contrasts; the analysis level "
                             f"{analysis_level!r} stops before them (run 'dataset', or leave --n-perm out).")
        if not any(n.level == "dataset" and _kind(n) == "glm" for n in self.graph.nodes.values()):
            raise InputError("--n-perm tests the contrasts of Dataset nodes of Type 'glm'; this model has "
                             "none (leave --n-perm out).")

    def _children(self, node, outputs, last):
        passed = [maps for maps in outputs if maps.test != "F"]
        for edge in node.children:
            child = edge.destination
            if _RANK[child.level] > last:
                continue
            infos = [_contrast_info(maps) for maps in passed]
            with pybids_refusal(f"node {child.name!r}"):
                specs = child.run(infos, group_by=child.group_by, **edge.filter)
            level = (self._fixed_effects if _kind(child) == "meta" else self._group_level)(child, specs, passed)
            try:
                child_outputs = list(chain.from_iterable(self._group(child, spec, passed, level)
                                                         for spec in specs))
            finally:
                level.close()
            if self.reports is not None:
                self.reports.flush(child.name)
            self._children(child, child_outputs, last)

    # -- run level -----------------------------------------------------------------

    def _run_level(self, node, specs) -> list[ContrastMaps]:
        high_pass = (node.model.get("options") or {}).get("high_pass_filter_cutoff_hz")
        models, plans = [], []
        for spec in specs:
            bold, mask, entities = self._run_files(spec)
            store_node = self._store_node(bold)
            n_volumes = int(store_node.data().shape[0])
            where = f"run {store_node.name}"
            design = run_design(spec.data, n_volumes, _repetition_time(spec, where), high_pass, where)
            model = FirstLevelModel(mask_img=mask, chunk_bytes=self.chunk_bytes, subject_label=entities.get("subject"))
            models.append(model.fit(store_node, design_matrices=design))
            plans.append((spec, entities, design, mask))
        outputs = []
        for model, (spec, entities, design, mask) in zip(fitted_in_waves(models), plans):
            outputs += self._write_run(node, model, spec, entities, design, mask)
            release_free_memory()
            self.progress(f"node {node.name}: {bids_name(_short(entities))} done")
        return outputs

    def _write_run(self, node, model, spec, entities, design, mask) -> list[ContrastMaps]:
        outputs, weights_of, z_maps = [], {}, {}
        with StagedOutput(self.output_dir) as out:
            design.to_csv(out.path(design_path(node.name, entities)), sep="\t", index=False)
            self._run_figures(out, node, entities, design, spec.contrasts)
            for name, stat in (("r_square", "rSquare"), ("log_likelihood", "logLikelihood")):
                image = model.voxelwise_images(name)[0]  # from the fits: no second read
                write_map(image, out.path(model_map_path(node.name, entities, stat)))
            for contrast in spec.contrasts:
                weights = _weights(contrast, design.columns, node.name)
                test = "t" if contrast.test == "pass" else contrast.test
                images = model.compute_contrast(weights if test == "F" else weights[0], test, "all")
                outputs.append(self._stage(out, node.name, contrast, images))
                if contrast.test != "pass":
                    weights_of[contrast.name], z_maps[contrast.name] = weights, images["z_score"]
        self._commit(out, outputs)
        if self.reports is not None:
            self.reports.run(node.name, entities, model, design, weights_of, z_maps, mask)
        return outputs

    def _run_figures(self, out, node, entities, design, contrasts) -> None:
        """fitlins' three figures of a run: the design matrix, the correlations of its regressors
        (none when fewer than two regressors are left without the constant and drifts, as
        nilearn's figure) and the weights of every contrast over the design."""
        save_figure(design_matrix_figure(design), [out.path(figure_path(node.name, entities, "design"))])
        correlations = design_matrix_correlation_figure(design)
        if correlations is not None:
            save_figure(correlations, [out.path(figure_path(node.name, entities, "corr"))])
        weights = [_weights(contrast, design.columns, node.name) for contrast in contrasts]
        if weights:
            names = ", ".join(str(contrast.name) for contrast in contrasts)
            save_figure(contrast_matrix_figure(np.vstack(weights), design, names),
                        [out.path(figure_path(node.name, entities, "contrasts"))])

    def _run_files(self, spec):
        """(bold path, mask path, the run's entities) of a run-level group, as fitlins selects them."""
        row = spec.metadata.iloc[0]
        entities = {key: row[key] for key in _RUN_ENTITIES if key in row and not pd.isna(row[key])}
        layout = self.graph.layout
        query = {**entities, "suffix": "bold", "desc": self.desc, "extension": [".nii", ".nii.gz"]}
        if self.space:
            query["space"] = self.space
        found = layout.get(**query)
        if len(found) != 1:
            raise InputError(f"{'no' if not found else len(found)} preprocessed BOLD file(s) for {entities} "
                             f"(desc-{self.desc}, space {self.space}); give --space or --derivatives so that "
                             "each run has one.")
        bold = found[0].path
        mask_query = {**layout.parse_file_entities(bold), "suffix": "mask", "desc": "brain",
                      "extension": [".nii", ".nii.gz"]}
        masks = layout.get(**mask_query)
        if not masks:
            raise InputError(f"no brain mask (desc-brain_mask) beside {bold}: chunkglm app fits each run "
                             "in its fMRIPrep brain mask.")
        return bold, masks[0].path, entities

    def _store_node(self, bold):
        name = bids_name(parse_entities(bold))
        node = self.cohort.runs.get(name)
        if node is None:
            raise InputError(f"the cohort store {self.cohort.location} has no run {name!r} (for {bold}); "
                             "convert the dataset with the same --task/--space/--participant-label.")
        return node

    # -- higher levels ---------------------------------------------------------------

    def _fixed_effects(self, node, specs, available) -> _Level:
        """Every group's and contrast's fixed effects of a "meta" node, as one graph over voxel
        blocks (:class:`~chunkglm.glm.stats_models.fixed_effects.FixedEffectsLevel`), computed here."""
        jobs, index = [], {}
        for number, spec in enumerate(specs):
            inputs, design = _inputs(node, spec, available)
            for contrast in spec.contrasts:
                chosen = _involved(inputs, design, _weights(contrast, design.columns, node.name))
                if not chosen:
                    raise InputError(f"node {node.name!r}, contrast {contrast.name!r}: no input map is involved "
                                     "(its conditions are zero in every row of the design); check the "
                                     "node's Model.X and the contrast's ConditionList.")
                index[(number, contrast.name)] = len(jobs)
                jobs.append([(str(maps.files["effect"]), str(maps.files["variance"])) for maps in chosen])
        return self._computed(node, specs, index, f"fixed effects of {len(jobs)} group contrast(s)",
                              lambda **where: FixedEffectsLevel(jobs, **where))

    def _group(self, node, spec, available, level) -> list[ContrastMaps]:
        """Write one group's maps of every contrast, from the node's computed ``level``."""
        _, design = _inputs(node, spec, available)
        kind = _kind(node)
        permute = self.permutation is not None and node.level == "dataset" and kind == "glm"
        outputs, group_contrasts, permuted = [], {}, {}
        with StagedOutput(self.output_dir) as out, self._glm_output() as glm_out:
            for contrast in spec.contrasts:
                weights = _weights(contrast, design.columns, node.name)
                test = "t" if contrast.test == "pass" else contrast.test
                images = level.images(spec, contrast.name)
                outputs.append(self._stage(out, node.name, contrast, images, z_score=kind != "meta"))
                if permute and contrast.test == "t":
                    permuted[contrast.name] = self._permute(out, node.name, outputs[-1], level.model(spec),
                                                            weights[0], images["z_score"])
                if glm_out is not None and contrast.test != "pass" and node.level in ("subject", "session"):
                    self.glm_layout.subject(glm_out, node, dict(contrast.entities), test, images)
                group_contrasts[contrast.name] = (weights if test == "F" else weights[0], test)
                if self.reports is not None and contrast.test != "pass":
                    self.reports.group(node.name, kind, dict(spec.entities), design, contrast.name,
                                       group_contrasts[contrast.name][0], images["z_score"], level.mask_img(spec))
            if glm_out is not None and node.level == "dataset" and kind == "glm":
                tested = {name: c for name, c in group_contrasts.items() if c[1] in ("t", "F")}
                self.glm_layout.group(glm_out, node, level.model(spec), tested, permuted)
        self._commit(out, outputs)
        if glm_out is not None:
            self.glm_written += [Path(p) for p in glm_out.written]
        self.progress(f"node {node.name}: {_describe(spec.entities)} done")
        return outputs

    def _glm_output(self):
        return StagedOutput(self.glm_dir) if self.glm_layout is not None else nullcontext(None)

    def _group_level(self, node, specs, available) -> _Level:
        """Every group's GLM and contrasts of a "glm" node above the run, as one graph over voxel
        blocks (:class:`~chunkglm.glm.stats_models.group_level.GroupLevel`), computed here."""
        groups = []
        for spec in specs:
            inputs, design = _inputs(node, spec, available)
            if len(inputs) < 2:
                raise InputError(f"node {node.name!r}: a GLM needs at least 2 input maps; this group has "
                                 f"{len(inputs)} (use \"Type\": \"meta\" to pass one input through).")
            wanted = []
            for contrast in spec.contrasts:
                weights = _weights(contrast, design.columns, node.name)
                test = "t" if contrast.test == "pass" else contrast.test
                wanted.append((weights if test == "F" else weights[0], test))
            groups.append(([str(maps.files["effect"]) for maps in inputs], design, wanted))
        index = {(number, c.name): position for number, spec in enumerate(specs)
                 for position, c in enumerate(spec.contrasts)}
        return self._computed(node, specs, index, f"GLMs of {len(groups)} group(s), {len(index)} contrast(s)",
                              lambda **where: GroupLevel(groups, **where))

    def _computed(self, node, specs, index, what, make) -> _Level:
        """A node's level, ``make(grids=..., chunk_bytes=..., scratch_dir=...)``, with its one graph
        computed here; ``index`` maps (group number, contrast name) to the level's job."""
        grids = [self.cohort.grid(grid_id) for grid_id in self.cohort.grids]
        level = make(grids=grids, chunk_bytes=self.chunk_bytes, scratch_dir=self._scratch.name)
        try:
            self.progress(f"node {node.name}: {what} over {level.lazy.numblocks[-1]} voxel block(s)")
            level.compute()
        except BaseException:
            level.close()
            raise
        return _Level(level, {id(spec): number for number, spec in enumerate(specs)}, index)

    def _permute(self, out, node_name, maps, model, weights, z_img) -> dict:
        """The permutation maps of one t contrast, staged with the contrast's other maps; returns
        nilearn's maps (``t``, ``logp_max_t``)."""
        name = maps.entities["contrast"]
        self.progress(f"node {node_name}: contrast {name}: {self.permutation.n_perm} permutations")
        images = self.permutation.run(model, weights)
        for key, img in self.permutation.fitlins_maps(images, z_img).items():
            stat, desc = key if isinstance(key, tuple) else (key, None)
            relative = map_path(node_name, maps.entities, stat, desc)
            write_map(img, out.path(relative))
            maps.files[f"{stat}_{desc}" if desc else stat] = relative
        return images

    # -- writing -----------------------------------------------------------------------

    def _stage(self, out, node_name, contrast, images, z_score=True) -> ContrastMaps:
        """fitlins' maps of one contrast (no z map for fixed effects, as fitlins)."""
        maps = ContrastMaps(dict(contrast.entities), contrast.test)
        names = dict(MAP_NAMES, stat=contrast.test)
        for key, img in images.items():
            if key == "z_score" and not z_score:
                continue
            if contrast.test == "pass" and key not in ("effect_size", "effect_variance"):
                continue
            relative = map_path(node_name, maps.entities, names[key])
            write_map(img, out.path(relative))
            maps.files[names[key]] = relative
        return maps

    def _commit(self, out, outputs):
        root = Path(out.out_dir)
        for maps in outputs:
            maps.files = {stat: root / relative for stat, relative in maps.files.items()}
        self.written += [Path(p) for p in out.written]


def _kind(node) -> str:
    return str(node.model.get("type", "glm")).lower()


def _repetition_time(spec, where) -> float:
    if "RepetitionTime" not in spec.metadata:
        raise InputError(f"{where}: no RepetitionTime in the BOLD file's sidecar.")
    return float(spec.metadata["RepetitionTime"].iloc[0])


def _short(entities: dict) -> dict:
    keys = {"subject": "sub", "session": "ses", "task": "task", "acquisition": "acq", "run": "run"}
    return {keys[k]: v for k, v in entities.items() if k in keys}


def _describe(entities: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in entities.items()) or "all inputs"


def _weights(contrast, columns, node_name) -> np.ndarray:
    """The contrast as a (rows, columns) weight matrix over the design's columns (fitlins' rule)."""
    columns = list(columns)
    missing = [c for c in contrast.conditions if c not in columns]
    if missing:
        raise InputError(f"node {node_name!r}, contrast {contrast.name!r}: {missing} not among the design's "
                         f"columns {columns}.")
    try:
        given = np.atleast_2d(np.asarray(contrast.weights, dtype=float))
    except (TypeError, ValueError):
        given = None
    if given is None or given.ndim != 2 or given.shape[1] != len(contrast.conditions):
        raise InputError(f"node {node_name!r}, contrast {contrast.name!r}: weights {contrast.weights!r} do not "
                         f"give one weight per condition of {list(contrast.conditions)} (one row per test "
                         "row, as the BIDS Stats Models specification says).")
    weights = np.zeros((given.shape[0], len(columns)))
    for index, condition in enumerate(contrast.conditions):
        weights[:, columns.index(condition)] = given[:, index]
    return weights


def _contrast_info(maps: ContrastMaps):
    name = maps.entities["contrast"]
    return ContrastInfo(name, [name], [1], maps.test, dict(maps.entities))


def _match(row: dict, available, node_name) -> ContrastMaps:
    """The input whose entities agree with every (non-missing) value of a design row."""
    wanted = {k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
    found = [maps for maps in available if all(maps.entities.get(k) == v for k, v in wanted.items())]
    if len(found) != 1:
        raise InputError(f"node {node_name!r}: {len(found)} input maps match the design row {wanted}; "
                         "check the node's GroupBy and the edge's Filter.")
    return found[0]


def _inputs(node, spec, available) -> tuple[list, pd.DataFrame]:
    """The input maps of a group, in the order of its design's rows, and the design."""
    rows = [{k: v for k, v in row.items() if k not in _NOT_ENTITIES}
            for row in spec.metadata.to_dict("records")]
    return [_match(row, available, node.name) for row in rows], spec.X.reset_index(drop=True)


def _involved(inputs, design, weights) -> list:
    """The inputs the contrast's first row involves (fitlins' rule for fixed effects)."""
    involved = design.loc[:, weights[0].astype(bool)].any(axis=1).to_numpy()
    return [maps for maps, keep in zip(inputs, involved) if keep]


@dataclass
class _Level:
    """A node's computed level (fixed effects of a "meta" node, or the GLMs of a "glm" node):
    the group number of each group (spec), and the job of each group's contrast."""

    level: FixedEffectsLevel | GroupLevel
    spec_number: dict
    job: dict

    def images(self, spec, contrast_name) -> dict:
        if isinstance(self.level, GroupLevel):
            number = self.spec_number[id(spec)]
            return self.level.images(number, self.job[(number, contrast_name)])
        return self.level.images(self.job[(self.spec_number[id(spec)], contrast_name)])

    def mask_img(self, spec):
        """The group's analysis mask (GLM nodes; fixed effects: None)."""
        return self.level.mask_img(self.spec_number[id(spec)]) if isinstance(self.level, GroupLevel) else None

    def model(self, spec):
        """The group's fitted SecondLevelModel (GLM nodes)."""
        return self.level.model(self.spec_number[id(spec)])

    def close(self) -> None:
        self.level.close()
