"""Root pytest configuration: options, markers by folder, tier skips, seeds, shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")           # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "SLMQUANT_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["SLMQUANT_DATA"] = str(ROOT.parent / "shared" / "data")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                      # macOS
        return os.cpu_count() or 1


# Torch threads: the cores shared among the xdist workers (one process gets them all), so that
# `pytest -n 4` on two cores does not run eight threads; SLMQUANT_THREADS overrides. Cells are not
# keyed by it: the gate's bands absorb the measured 1-vs-2-thread spread (docs/gate_bands.md).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = int(os.environ.get("SLMQUANT_THREADS") or max(1, _cores() // WORKERS))
torch.set_num_threads(THREADS)
# Devices: one GPU per xdist worker (`pytest -n <number of GPUs> -m gpu` on a multi-GPU runner), the
# baseline folder named after the GPU (tests/baseline.py device_class); the CPU otherwise.
from tests.baseline import worker_device  # noqa: E402

DEVICE = worker_device(os.environ.get("PYTEST_XDIST_WORKER"), torch.cuda.device_count() if torch.cuda.is_available() else 0)
if DEVICE.startswith("cuda"):
    torch.cuda.set_device(torch.device(DEVICE))

try:                                            # property tests: the same examples on every CI run
    from hypothesis import settings as _hsettings
    _hsettings.register_profile("ci", derandomize=True, deadline=None)
    if os.environ.get("CI"):
        _hsettings.load_profile("ci")
except ImportError:
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run the slow real-model tier")


def pytest_configure(config):
    global _config
    _config = config
    from tests.baseline import device_class
    config.slmquant_gate_failures = []
    dev = device_class()
    missing = not (ROOT / "baselines" / dev).is_dir() and not config.option.update_snapshots
    config.slmquant_missing_baselines = dev if missing else None


def pytest_report_header(config):
    """Printed by the controller, which has no worker count in its environment: read the option."""
    from tests.baseline import device_class
    workers = getattr(config.option, "numprocesses", None)
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    threads = int(os.environ.get("SLMQUANT_THREADS") or max(1, _cores() // workers))
    return (f"slmquant: device {DEVICE}, baseline class {device_class()}, {threads} torch thread(s) per "
            f"process ({workers} worker process(es) on {_cores()} core(s))")


def pytest_runtest_logreport(report):
    if report.when == "call":
        for name, value in report.user_properties:
            if name == "slmquant_gate_failures":
                _config.slmquant_gate_failures.append((report.nodeid, report.outcome, value))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """On red, one summary: each cell that moved, by how much, against which band and gate."""
    rows = [(n, o, v) for n, o, v in config.slmquant_gate_failures if o == "failed"]
    if rows:
        terminalreporter.section("slmquant gate summary")
        for nodeid, _, lines in rows:
            for line in lines:
                terminalreporter.line(line)
        terminalreporter.line("An intended change? Re-record: see docs/gate_bands.md, 'When a gate turns red'.")
    if config.slmquant_missing_baselines:
        dev = config.slmquant_missing_baselines
        terminalreporter.section("slmquant: no baselines for this device class", red=True)
        terminalreporter.line(f"baselines/{dev}/ does not exist: every baseline test was skipped. Record them:\n"
                              f"  pytest --snapshot-update -p no:randomly   (writes baselines/{dev}/)")


def pytest_sessionfinish(session, exitstatus):
    if session.config.slmquant_missing_baselines and session.exitstatus == 0:
        session.exitstatus = 1                  # fails once, not once per cell


_config = None


def pytest_collection_modifyitems(config, items):
    runslow = config.getoption("--runslow")
    missing = config.slmquant_missing_baselines
    cuda = torch.cuda.is_available()
    for item in items:
        parts = Path(str(item.fspath)).parts
        for track in ("track1", "track2", "track3"):
            if any(p.startswith(track + "_") for p in parts):
                item.add_marker(getattr(pytest.mark, track))
        if "slow" in item.keywords and not runslow:
            item.add_marker(pytest.mark.skip(reason="slow real-model tier: pass --runslow"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if missing and "baseline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.skip(reason=f"no baselines for device class {missing}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The whole bundled SmolLM2-135M in float32 (from the on-disk cache after the first run)."""
    from slmquant.models import load_model
    return load_model("smollm2-135m", device=DEVICE)


@pytest.fixture(scope="session")
def tok():
    from slmquant.models import smollm2_tokenizer
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def snapshot_ext():
    from tests.baseline import BaselineExtension
    return BaselineExtension


@pytest.fixture
def baseline(request, snapshot, snapshot_ext):
    """syrupy's snapshot with the tolerance-aware baseline extension; a default-tier cell's gated
    statistics compare within that cell's measured bands (tests/gates.py)."""
    from tests import gates
    cell = getattr(getattr(request.node, "callspec", None), "params", {}).get("cell")
    gated = cell is not None and request.node.originalname == "test_cell_gate"
    bands = gates.bands(cell.id) if gated else None
    return snapshot.use_extension(snapshot_ext.with_bands(bands) if bands else snapshot_ext)


@pytest.fixture(scope="session")
def float_models():
    """model alias -> (float model, tokenizer), loaded once per session."""
    from slmquant.models import load_model
    cache = {}

    def get(alias):
        if alias not in cache:
            cache[alias] = load_model(alias, device=DEVICE)
        return cache[alias]
    return get


@pytest.fixture(scope="session")
def float_ref(float_models, tmp_path_factory, request):
    """(alias, tier) -> tests.gates.FloatReference: the float model scored once per session, by the
    first xdist worker that needs it; the others read its file in the session's shared temporary
    folder (0.8 GB for SmolLM2 on the default tier). Each worker removes the file when it finishes:
    a worker that has read it keeps its mapping, and one that needs it later computes it again."""
    from tests.gates import FloatReference
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent                  # basetemp/popen-gwN: the parent is the session's
    cache, stores = {}, []

    def remove_stores():
        for store in stores:
            store.unlink(missing_ok=True)
    request.addfinalizer(remove_stores)

    def get(alias, tier):
        key = (alias, tier.name)
        if key not in cache:
            model, tok = float_models(alias)
            store = shared / f"float-ref-{alias}-{tier.name}-{model.slmquant_source.key}-t{torch.get_num_threads()}.pt"
            stores.append(store)
            cache[key] = FloatReference(model, tok, tier, store=store)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def gate_metrics(quantized, float_ref, float_models):
    """cell -> the default tier's gate statistics of a cell (KL from float, perplexity ratio, and the
    damage ratio to the RTN cell with the same settings), memoized, and kept in the measurement cache
    under a key of the cell (its own cache key: source, settings, the method's code), the float
    model, the windows, the scoring code and the gate's own: an RTN twin that several workers (or the
    mutation tier) need is scored once."""
    from slmquant import evaluate
    from slmquant.measure import MeasureCache, float_key
    from tests import gates
    from tests.matrix import DEFAULT
    memo: dict = {}

    def get(cell):
        if cell.id not in memo:
            fmodel, tok = float_models(cell.model)
            key = f"{cell.key(fmodel.slmquant_source.key)}|ref={float_key(fmodel)}"
            m = dict(MeasureCache().scores("gate", key, evaluate.wikitext2_tokens(tok), DEFAULT.seqlen,
                                           DEFAULT.windows, lambda: float_ref(cell.model, DEFAULT).score(quantized(cell)[0]),
                                           code=gates.gate_code_hash()))
            if cell.method != "rtn":
                m["damage_ratio"] = m["kl"] / get(gates.rtn_twin(cell))["kl"]
            memo[cell.id] = m
        return memo[cell.id]
    return get


@pytest.fixture(scope="session")
def quantized(float_models):
    """cell -> (model, record): each cell quantized once, through the on-disk cache that xdist
    workers share (file lock per cell); the last two cells stay in memory."""
    from slmquant.cells import CellCache
    store = CellCache()
    memo: dict = {}

    def get(cell):
        if cell not in memo:
            model, tok = float_models(cell.model)
            while len(memo) >= 2:
                memo.pop(next(iter(memo)))
            memo[cell] = store.get(cell, model, tok)[:2]
        return memo[cell]
    return get
