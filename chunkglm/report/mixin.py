"""``generate_report`` of the GLM models (first and second level), nilearn's signature."""

from __future__ import annotations

from chunkglm.report.build import model_report



class GLMReportMixin:
    """Adds nilearn's ``generate_report`` to a fitted GLM model (see :mod:`chunkglm.report.build`)."""

    @property
    def _reporting_data(self) -> dict:
        """nilearn's private record of a fitted first-level model's inputs, as a read-only view.

        nilearn's models keep in ``_reporting_data`` what their report and
        ``save_glm_to_bids`` read about the inputs; code written against it
        (nilearn's own tests) finds ``{"run_imgs": {run index: {"entities":
        BIDS entities of the input}}}`` here, built from ``run_entities_``
        on each access (so changing the dict changes nothing). Empty before
        fit and for a second-level model. nilearn's other keys (trial types,
        the files written by ``save_glm_to_bids``) are not given.
        """
        entities = getattr(self, "run_entities_", None)
        if entities is None or not self._is_first_level_glm():
            return {}
        return {"run_imgs": {index: {"entities": dict(e or {})} for index, e in enumerate(entities)}}

    def generate_report(self, contrasts=None, first_level_contrast=None, title=None,
                        bg_img="MNI152TEMPLATE", threshold=None, alpha=0.001, cluster_threshold=0,
                        height_control="fpr", two_sided=False, min_distance=8.0, plot_type="slice",
                        cut_coords=None, display_mode=None, report_dims=(1600, 800)):
        """An HTML report of the model, as nilearn's ``generate_report``.

        As nilearn 0.14: an unfitted model gives a page of its parameters
        (no mask, no maps) with nilearn's "This estimator has not been fit
        yet." UserWarning; no ``contrasts`` gives no maps, with nilearn's
        "No contrast passed during report generation." warning; options that
        are not used (``threshold`` with a ``height_control``, ``cut_coords``
        with a glass brain, ``first_level_contrast`` at the first level) are
        said in nilearn's words, as a warning and on the page; invalid
        options raise ValueError with nilearn's message first. The page has
        nilearn's section ids and one carousel panel per run.

        Model parameters, inputs, design matrices and their correlations,
        contrast weights, the mask, each contrast's thresholded z map with its
        cluster table (chunkglm's ``threshold_stats_img`` and
        ``get_clusters_table``: nilearn's numbers), and a provenance record
        (chunkglm version, the cluster that computed the maps, wall time).
        Figures are drawn by nilearn and embedded: the page reads offline.

        Surface models: the maps are drawn on their mesh (nilearn's
        ``plot_surf_stat_map``, each hemisphere's lateral and medial view), the
        cluster tables are nilearn's for meshes (adjacent vertices), and
        ``plot_type``, ``cut_coords``, ``display_mode`` and ``min_distance`` are not
        used; ``bg_img`` must then be a SurfaceImage on the maps' mesh or None
        (nilearn's TypeError otherwise). CIFTI models: the cortex is drawn on the
        mesh nilearn ships with its number of vertices (fsaverage5), each
        structure of the brain-model axis is listed with its surviving
        grayordinates, and ``cluster_threshold`` is not used (no clusters on
        grayordinates; the page says so). See :mod:`chunkglm.report.surface`.

        Parameters
        ----------
        contrasts : dict, str, array or list of them, optional
            As nilearn's: ``{name: definition}``, a formula, weights, or a list.
            None: no statistical map (nilearn's warning).
        first_level_contrast : str or array, optional
            Second level: the first-level contrast modelled (required for a model
            fitted on first-level models). Ignored at the first level, with
            nilearn's warning (and on the page).
        title : str, optional
            Default: the model type and the contrast names.
        bg_img : image, "MNI152TEMPLATE" or None
            Background of the maps and the mask.
        threshold : float, optional
            z threshold, used only with ``height_control=None`` (then default 3.09).
        alpha : float, default=0.001
            p-value ('fpr', 'bonferroni') or q-value ('fdr').
        cluster_threshold : int, default=0
            Clusters smaller than this many voxels are not shown.
        height_control : {"fpr", "fdr", "bonferroni", None}, default="fpr"
        two_sided : bool, default=False
        min_distance : float, default=8.0
            Minimum distance (mm) between subpeaks in the cluster tables.
        plot_type : {"slice", "glass"}, default="slice"
        cut_coords : optional
            Cuts of the slice plots (nilearn's).
        display_mode : str, optional
            Default "z" for slices, "lzry" for glass brains.
        report_dims : (int, int)
            Width and height of the report within a notebook.

        Returns
        -------
        chunkglm.report.HTMLReport
            ``save_as_html(path)``, ``open_in_browser()``, shown inline in notebooks.
        """
        return model_report(self, contrasts, first_level_contrast, title, report_dims, bg_img=bg_img,
                            threshold=threshold, alpha=alpha, cluster_threshold=cluster_threshold,
                            height_control=height_control, two_sided=two_sided, min_distance=min_distance,
                            plot_type=plot_type, cut_coords=cut_coords, display_mode=display_mode)
