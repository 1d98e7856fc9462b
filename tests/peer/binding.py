"""pytest plugin: run an anchor's installed test modules with the names under test bound to chunkglm's.

Loaded with ``-p binding`` (``tests/peer`` on ``sys.path``) by
:mod:`tests.peer.suites`, in a pytest process of its own whose rootdir is the
anchor's installed package. Nothing of the anchor is copied or edited: while
its test modules are imported, and whenever their functions import, an
``import`` hook hands them a view of the module imported in which each
public object that chunkglm implements (``BINDINGS``) is replaced by
chunkglm's. Every other name (the anchor's data generators, private helpers,
fixtures) stays the anchor's own, so a test compares chunkglm with the
anchor's expectations exactly as written.

Options
-------
--peer-bindings=nilearn|nimare   which table of ``BINDINGS`` applies
--peer-exclusions=FILE           test ids left out, one per line, each with its reason
--peer-report=FILE               JSON {test id: "passed" | "failed" | "skipped" | "untouched"}
                                 written at the end ("untouched": passed without calling chunkglm)
"""

from __future__ import annotations

import builtins
import functools
import importlib
import json
import types
from pathlib import Path

import pytest

#: anchor object (module path, name) -> chunkglm object (module path, name)
BINDINGS = {
    "nilearn": {
        ("nilearn.glm.first_level", "FirstLevelModel"): ("chunkglm.glm.first_level", "FirstLevelModel"),
        ("nilearn.glm.first_level", "first_level_from_bids"):
            ("chunkglm.glm.first_level", "first_level_from_bids"),
        ("nilearn.glm.second_level", "SecondLevelModel"): ("chunkglm.glm.second_level", "SecondLevelModel"),
        ("nilearn.glm.second_level", "non_parametric_inference"):
            ("chunkglm.glm.second_level", "non_parametric_inference"),
        ("nilearn.glm.thresholding", "threshold_stats_img"):
            ("chunkglm.glm.thresholding", "threshold_stats_img"),
        ("nilearn.glm.thresholding", "fdr_threshold"): ("chunkglm.glm.thresholding", "fdr_threshold"),
        ("nilearn.glm.thresholding", "cluster_level_inference"):
            ("chunkglm.glm.thresholding", "cluster_level_inference"),
        ("nilearn.reporting", "get_clusters_table"): ("chunkglm.reporting", "get_clusters_table"),
        ("nilearn.interfaces.bids", "save_glm_to_bids"): ("chunkglm.interfaces.bids", "save_glm_to_bids"),
        ("nilearn.glm.io", "save_glm_to_bids"): ("chunkglm.glm.io", "save_glm_to_bids"),
        ("nilearn.reporting", "make_glm_report"): ("chunkglm.reporting", "make_glm_report"),
        ("nilearn.reporting", "HTMLReport"): ("chunkglm.reporting", "HTMLReport"),
        ("nilearn.maskers", "NiftiMapsMasker"): ("chunkglm.maskers", "NiftiMapsMasker"),
        ("nilearn.maskers", "MultiNiftiMapsMasker"): ("chunkglm.maskers", "MultiNiftiMapsMasker"),
    },
    "nimare": {
        **{("nimare.meta.ibma", name): ("chunkglm.meta.ibma", name) for name in (
            "Fishers", "Stouffers", "WeightedLeastSquares", "DerSimonianLaird", "Hedges",
            "SampleSizeBasedLikelihood", "VarianceBasedLikelihood", "PermutedOLS",
            "FixedEffectsHedges", "IBMAEstimator")},
        ("nimare.correct", "FDRCorrector"): ("chunkglm.correct", "FDRCorrector"),
        ("nimare.correct", "FWECorrector"): ("chunkglm.correct", "FWECorrector"),
        ("nimare.results", "MetaResult"): ("chunkglm.results", "MetaResult"),
    },
}

_original_import = builtins.__import__
_bound: dict[int, tuple[object, object]] = {}  # id(anchor object) -> (anchor object, chunkglm object)
_package = ""


class _BoundView:
    """A module as the peer test sees it: bound names swapped for chunkglm's."""

    def __init__(self, module):
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, types.ModuleType) and value.__name__.startswith(_package + "."):
            return _BoundView(value)  # ``from nimare.meta import ibma`` then ``ibma.Fishers``
        entry = _bound.get(id(value))
        return entry[1] if entry is not None and entry[0] is value else value

    def __setattr__(self, name, value):  # monkeypatch.setattr(view, ...) patches the module
        setattr(self._module, name, value)

    def __delattr__(self, name):
        delattr(self._module, name)

    def __dir__(self):
        return dir(self._module)


def _is_peer_test(module_name: str) -> bool:
    return module_name.startswith(_package + ".") and module_name.rsplit(".", 1)[-1].startswith("test_")


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    module = _original_import(name, globals, locals, fromlist, level)
    if globals is not None and _is_peer_test(str(globals.get("__name__", ""))) and (
            fromlist or (level == 0 and name.split(".", 1)[0] == _package)):
        return _BoundView(module)  # ``import nimare`` too: ``nimare.results.MetaResult`` is then chunkglm's
    return module


_touched = [False]  # did the running test call any chunkglm name?


def _watched(ours):
    """``ours``, noting when it is called (a class: when it is instantiated)."""
    if isinstance(ours, type):
        if not getattr(ours.__init__, "_peer_watched", False):
            init = ours.__init__

            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                _touched[0] = True
                init(self, *args, **kwargs)

            __init__._peer_watched = True
            ours.__init__ = __init__
        return ours

    @functools.wraps(ours)
    def call(*args, **kwargs):
        _touched[0] = True
        return ours(*args, **kwargs)

    return call


def _resolve(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def pytest_addoption(parser):
    group = parser.getgroup("peer", "anchor test suites run against chunkglm")
    group.addoption("--peer-bindings", default=None, help="nilearn or nimare")
    group.addoption("--peer-exclusions", default=None, help="file of test ids left out, with reasons")
    group.addoption("--peer-report", default=None, help="JSON file of outcomes per test id")
    group.addoption("--peer-missing-data", default=None,
                    help="FIXTURE[,FIXTURE...]=REASON: skip the tests using these fixtures")


def pytest_configure(config):
    global _package
    table = config.getoption("--peer-bindings")
    if table is None:
        return
    _package = table
    for (src_module, src_name), (dst_module, dst_name) in BINDINGS[table].items():
        anchor, ours = _resolve(src_module, src_name), _resolve(dst_module, dst_name)
        _bound[id(anchor)] = (anchor, _watched(ours))
    builtins.__import__ = _import
    config._peer_outcomes = {}
    if table == "nilearn":
        _harness_sees_ours()


#: nilearn's estimator-check module decides which checks apply, and what they expect, with
#: ``isinstance`` against nilearn's classes; each chunkglm class stands for the class it mirrors
#: there too (isinstance takes a tuple), so the checks nilearn runs on its class run on ours.
HARNESS_CLASSES = {
    "FirstLevelModel": ("chunkglm.glm.first_level", "FirstLevelModel"),
    "SecondLevelModel": ("chunkglm.glm.second_level", "SecondLevelModel"),
    "NiftiMapsMasker": ("chunkglm.maskers", "NiftiMapsMasker"),
    "MultiNiftiMapsMasker": ("chunkglm.maskers", "MultiNiftiMapsMasker"),
    "_MultiMixin": ("chunkglm.maskers", "MultiNiftiMapsMasker"),  # nilearn's multi-run maskers
}


def _harness_sees_ours():
    checks = importlib.import_module("nilearn._utils.estimator_checks")
    for name, (module, ours) in HARNESS_CLASSES.items():
        theirs = getattr(checks, name)
        setattr(checks, name, (theirs, getattr(importlib.import_module(module), ours)))


def pytest_unconfigure(config):
    builtins.__import__ = _original_import


def read_exclusions(path) -> dict[str, str]:
    """Test id -> reason, from lines ``<test id>  # <reason>`` (blank lines and comments skipped)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        test_id, _, reason = line.partition("#")
        if not reason.strip():
            raise ValueError(f"{path}: {test_id.strip()!r} is excluded without a reason")
        out[test_id.strip()] = reason.strip()
    return out


def _excluded(nodeid: str, exclusions: dict[str, str]) -> bool:
    # an id without "[...]" excludes every parametrisation of that test
    return nodeid in exclusions or nodeid.split("[", 1)[0] in exclusions


def pytest_collection_modifyitems(config, items):
    missing = config.getoption("--peer-missing-data")
    if missing:  # the anchor's test data are not on this machine: say so instead of failing
        fixtures, _, reason = missing.partition("=")
        for item in items:
            if set(fixtures.split(",")) & set(getattr(item, "fixturenames", ())):
                item.add_marker(pytest.mark.skip(reason=reason))
    path = config.getoption("--peer-exclusions")
    if not path:
        return
    exclusions = read_exclusions(path)
    kept = [item for item in items if not _excluded(item.nodeid, exclusions)]
    deselected = [item for item in items if _excluded(item.nodeid, exclusions)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = kept


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # an estimator built when the module was collected (sklearn's parametrize_with_checks) is
    # chunkglm's object under test although no chunkglm name is called during the test itself
    params = getattr(getattr(item, "callspec", None), "params", {})
    _touched[0] = any(_is_ours(value) for value in params.values())


def _is_ours(value) -> bool:
    ours = tuple(entry[1] for entry in _bound.values())
    classes = tuple(o for o in ours if isinstance(o, type))
    if isinstance(value, (list, tuple)):
        return any(_is_ours(v) for v in value)
    return (classes and isinstance(value, classes)) or any(value is o for o in ours)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # made where the test ran (an xdist worker too); user_properties travel with the report
    outcome = yield
    if call.when == "call":
        outcome.get_result().user_properties.append(("chunkglm_touched", _touched[0]))


def pytest_runtest_logreport(report):
    """Outcome per id: "failed" if any phase failed, "skipped", "passed", or "untouched" for a
    test that passed without calling any chunkglm name (it tests the anchor's own functions)."""
    outcomes = getattr(_config, "_peer_outcomes", None)
    if outcomes is None:
        return
    previous = outcomes.get(report.nodeid)
    if report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.skipped and previous != "failed":
        outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and previous is None:
        touched = dict(report.user_properties).get("chunkglm_touched", False)
        outcomes[report.nodeid] = "passed" if touched else "untouched"


def pytest_collectreport(report):
    outcomes = getattr(_config, "_peer_outcomes", None)
    if outcomes is not None and report.failed:  # a module that cannot even be imported
        outcomes[report.nodeid] = "failed"


_config = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    global _config
    _config = session.config


def pytest_sessionfinish(session):
    path = session.config.getoption("--peer-report")
    outcomes = getattr(session.config, "_peer_outcomes", None)
    if path and outcomes is not None:
        Path(path).write_text(json.dumps(outcomes, indent=0, sort_keys=True))
