"""Track 3 (first part): every cell carries the cost of its quantization from the start: wall time,
peak memory and the counter that measured it, and the calibration budget of methods that calibrate."""
import pytest

from tests.matrix import DEFAULT, cases


@pytest.mark.parametrize("cell", cases(DEFAULT))
def test_cell_records_its_quantization_cost(cell, quantized):
    _, record = quantized(cell)
    cost = record["cost"]
    assert cost["wall_s"] > 0 and cost["device"] in ("cpu", "cuda")
    # the quantized copy lives beside the float model: the peak holds at least one whole model
    assert cost["peak_mem_bytes"] > 500 * 2**20 and "VmHWM" in cost["mem_counter"] or "cuda" in cost["mem_counter"]
    assert record["settings"]["w_bits"] == cell.cfg.w_bits and record["cell"] == cell.id
    assert record["source"]["stand_in_for"] == "HuggingFaceTB/SmolLM2-135M"
