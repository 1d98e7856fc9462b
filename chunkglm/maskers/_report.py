"""``generate_report`` of the maps maskers: nilearn's report, page for page.

The report is nilearn's own (``nilearn.maskers._mixin.MaskerReportMixin``,
its template ``body_nifti_maps_masker.jinja``): the summary table of the
masker's parameters, the number of maps and the ones displayed
(``displayed_maps``), each map drawn over the middle volume of the images
given to ``fit`` (or alone when ``fit`` had none), and nilearn's warnings on
the page. What the masker hands to it (``_reporting_data``) is set by
``fit``: the maps image on the fitted grid (``maps_img_``), the mask and a
3-D view of the fitted images (NIfTI
inputs only: for store runs the report draws the maps alone, since one volume of
a store run would read all its chunks).

nilearn's report classes are private to nilearn: this module is the one place
that depends on them, so a nilearn release that moves them changes only it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from nilearn.image import get_data, index_img
from nilearn.maskers._mixin import MaskerReportMixin
from nilearn.maskers._utils import compute_middle_image
from nilearn.maskers.base_masker import check_displayed_maps, sanitize_displayed_maps

from chunkglm.io.cohort import Node


class MapsReportMixin(MaskerReportMixin):
    """nilearn's NiftiMapsMasker report on chunkglm's maps maskers."""

    _REPORT_DEFAULTS: ClassVar[dict[str, Any]] = {
        "description": "This report shows the spatial maps provided to the mask.",
        "number_of_maps": 0,
    }
    _template_name = "body_nifti_maps_masker.jinja"

    def _set_reporting_data(self, imgs):
        """What the report draws, as nilearn's fit records it (``reports=True`` only)."""
        self._report_content["reports_at_fit_time"] = self.reports
        if not self.reports:
            return
        self._reporting_data = {"maps_image": self.maps_img_, "mask": self.mask_img_, "dim": None,
                                "images": None, "fit_images": None}
        if imgs is not None and not any(
                isinstance(i, Node) for i in (imgs if isinstance(imgs, list | tuple) else [imgs])):
            # Store runs: the maps alone (a middle volume reads all chunks). Files and images: the
            # middle volume is taken when a report is built, not here as nilearn does: on a
            # gzipped MNI 2 mm run that is one more read of the whole file (4 s of an 8 s fit).
            self._reporting_data["fit_images"] = imgs

    def _take_middle_image(self):
        """The middle volume of the images given to fit, once, when a report needs it."""
        # kept inside _reporting_data: building a report must not change the masker's __dict__
        data = getattr(self, "_reporting_data", None)
        if data is not None and data.get("fit_images") is not None:
            data["images"], data["dim"] = compute_middle_image(data.pop("fit_images"))
            data["fit_images"] = None

    def _run_report_checks(self, **kwargs):
        self._take_middle_image()
        super()._run_report_checks(**kwargs)
        if not self._has_report_data():
            return
        displayed_maps = kwargs.get("displayed_maps", 10)
        check_displayed_maps(displayed_maps)
        n_maps = get_data(self._reporting_data["maps_image"]).shape[-1]
        _, shown = sanitize_displayed_maps(self, displayed_maps, n_maps)
        self._report_content["number_of_maps"] = n_maps
        self._report_content["displayed_maps"] = shown
        if self._reporting_data["images"] is None:
            self._append_report_warning(f"No image provided to fit in {type(self).__name__}. "
                                        "Plotting only spatial maps for reporting.")
        elif self._reporting_data["dim"] == 5:
            self._append_report_warning("A list of 4D subject images were provided to fit. "
                                        "Only first subject is shown in the report.")

    def _load_report_displays(self) -> list:
        if not self._has_report_data():
            return [None]
        return self._create_figure_for_report()

    def _create_figure_for_report(self) -> list:
        try:  # matplotlib is optional, as for nilearn
            from nilearn.plotting import cm, find_xyz_cut_coords, plot_img, plot_stat_map
        except ImportError:
            return [None]
        self._take_middle_image()
        maps_image = self._reporting_data["maps_image"]
        img = self._reporting_data["images"]
        displays = []
        for component in self._report_content["displayed_maps"]:
            one_map = index_img(maps_image, component)
            if img is None:
                display = plot_stat_map(one_map, cmap=cm.black_blue)
            else:
                display = plot_img(img, cut_coords=find_xyz_cut_coords(one_map), black_bg=False,
                                   cmap=self.cmap)
                display.add_overlay(one_map, cmap=cm.black_blue)
            displays.append(display)
            display.close()
        return displays

    def _get_summary_html(self, summary):
        return self._dict_to_html(summary)
