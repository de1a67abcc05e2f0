"""Accelerator descriptions (targets/accel/spec.py): presets, TOML files, overrides, and a
clear error naming the file and the field for every kind of invalid description."""

from __future__ import annotations

import pytest
from mmcompile.targets.accel.spec import AccelSpec, AccelSpecError, load_spec, presets

from mmcompile.errors import MMCompileError

GOOD = """
name = "my-npu"
rows = 8
cols = 16
dataflow = "os"
clock_mhz = 500
scratchpad_kib = 64
accumulator_kib = 16
double_buffer = false
dram_gbps = 4.0
dram_latency_cycles = 80
ops = ["Conv", "MatMul", "Relu", "QuantizeLinear"]

[energy]
dram_pj_per_byte = 100.0
"""


def test_the_three_presets_load_with_their_documented_figures():
    specs = presets()
    assert set(specs) == {"vta-16x16", "gemmini-16x16", "edge-32x32"}
    vta = specs["vta-16x16"]
    assert (vta.rows, vta.cols, vta.dataflow) == (16, 16, "ws")
    # vta_config.json: LOG_INP/WGT/ACC_BUFF_SIZE = 15/18/17, the output buffer acc / 4
    assert (vta.input_kib, vta.weight_kib, vta.accumulator_kib, vta.output_kib) == \
        (32, 256, 128, 32)
    gemmini = specs["gemmini-16x16"]
    assert (gemmini.scratchpad_kib, gemmini.accumulator_kib) == (256, 64)
    assert gemmini.dataflows == ("ws", "os") and gemmini.input_kib is None
    edge = specs["edge-32x32"]
    assert edge.pe_count == 1024 and edge.dram_bytes_per_cycle == pytest.approx(32.0)
    for name, spec in specs.items():
        assert load_spec(name) == spec
        facts = spec.describe()
        assert facts["name"] == name and facts["pe_count"] == spec.rows * spec.cols
        assert facts["energy"]["mac_pj"] > 0 and spec.source
        assert AccelSpec.from_dict(spec.to_dict()) == spec  # the dict form round-trips


def test_a_toml_file_loads_and_gbps_becomes_bytes_per_cycle(tmp_path):
    path = tmp_path / "npu.toml"
    path.write_text(GOOD)
    spec = load_spec(path)
    assert (spec.name, spec.rows, spec.cols, spec.dataflow, spec.slots) == \
        ("my-npu", 8, 16, "os", 1)
    assert spec.dram_bytes_per_cycle == pytest.approx(8.0)  # 4 GB/s at 500 MHz
    assert spec.dram_gbps == pytest.approx(4.0)
    assert spec.energy.dram_pj_per_byte == 100.0 and spec.energy.mac_pj == 0.3  # default kept
    assert load_spec(str(path)) == spec


def _base() -> dict:
    return presets()["gemmini-16x16"].to_dict()


def _without(key):
    def edit(d):
        del d[key]
    return edit


INVALID = {
    # case: (edit of a valid dict, field the message must name, words it must contain)
    "unknown key": (lambda d: d.update(rowz=4), "rowz", "did you mean 'rows'"),
    "missing rows": (_without("rows"), "rows", "missing"),
    "missing bandwidth": (_without("dram_bytes_per_cycle"), "dram_bytes_per_cycle", "missing"),
    "zero rows": (lambda d: d.update(rows=0), "rows", "positive"),
    "negative scratchpad": (lambda d: d.update(scratchpad_kib=-1), "scratchpad_kib", "positive"),
    "zero clock": (lambda d: d.update(clock_mhz=0), "clock_mhz", "positive"),
    "negative latency": (lambda d: d.update(dram_latency_cycles=-5), "dram_latency_cycles",
                         "non-negative"),
    "rows as text": (lambda d: d.update(rows="16"), "rows", "integer"),
    "float rows": (lambda d: d.update(rows=16.0), "rows", "integer"),
    "bool rows": (lambda d: d.update(rows=True), "rows", "integer"),
    "double buffer as text": (lambda d: d.update(double_buffer="yes"), "double_buffer",
                              "true or false"),
    "ops as text": (lambda d: d.update(ops="Conv"), "ops", "list"),
    "unknown dataflow": (lambda d: d.update(dataflow="rs", dataflows=[]), "dataflow",
                         "unknown dataflow"),
    "dataflow the hardware lacks": (lambda d: d.update(dataflow="is"), "dataflow",
                                    "not among"),
    "unknown op": (lambda d: d.update(ops=["Conv", "Softmax"]), "ops", "unknown op"),
    "no contraction": (lambda d: d.update(ops=["Relu"]), "ops", "at least one"),
    "array too big for the scratchpad": (lambda d: d.update(rows=512, cols=512),
                                         "scratchpad_kib", "too big"),
    "accumulator too small": (lambda d: d.update(accumulator_kib=0.1), "accumulator_kib",
                              "cannot hold"),
    "16-bit operands": (lambda d: d.update(operand_bits=16), "operand_bits", "only 8"),
    "both bandwidths": (lambda d: d.update(dram_gbps=16.0), "dram_gbps", "not both"),
    "half a partition": (lambda d: d.update(input_kib=32), "weight_kib", "both"),
    "partition over the scratchpad": (lambda d: d.update(input_kib=200, weight_kib=200),
                                      "scratchpad_kib", "cannot hold"),
    "weight partition too small": (lambda d: d.update(input_kib=128, weight_kib=0.25),
                                   "weight_kib", "weight tile"),
    "unknown energy": (lambda d: d.update(energy={"sram_pj": 1.0}), "energy.sram_pj",
                       "unknown field"),
    "negative energy": (lambda d: d.update(energy={"mac_pj": -1.0}), "energy.mac_pj",
                        "non-negative"),
    "energy as a number": (lambda d: d.update(energy=3), "energy", "table"),
    "empty name": (lambda d: d.update(name=" "), "name", "non-empty"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_every_invalid_description_names_the_source_and_the_field(case):
    edit, field_name, words = INVALID[case]
    data = _base()
    edit(data)
    with pytest.raises(AccelSpecError) as info:
        AccelSpec.from_dict(data, source="npu.toml")
    message = str(info.value)
    assert message.startswith("npu.toml: field ") and f"'{field_name}'" in message, message
    assert words in message, message
    assert isinstance(info.value, MMCompileError)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("rows = 8", "rows = -8"))
    with pytest.raises(AccelSpecError, match=r"bad\.toml: field 'rows': must be positive"):
        load_spec(path)
    path.write_text("rows = = 3")
    with pytest.raises(AccelSpecError, match=r"bad\.toml: not valid TOML"):
        load_spec(path)
    with pytest.raises(AccelSpecError, match="neither an accelerator preset"):
        load_spec(tmp_path / "missing.toml")
    with pytest.raises(AccelSpecError, match="vta-16x16"):  # the presets are listed
        load_spec("tpu-128x128")


def test_overrides_make_sweep_points_and_are_checked_again():
    base = presets()["edge-32x32"]
    points = [base.with_overrides(rows=r, cols=r) for r in (8, 16, 32)]
    assert [(p.rows, p.cols) for p in points] == [(8, 8), (16, 16), (32, 32)]
    assert len({p.name for p in points}) == 3 and points[0].name == "edge-32x32{rows=8,cols=8}"
    assert points[0].scratchpad_kib == base.scratchpad_kib  # the rest is kept
    cheaper = base.with_overrides(energy={"dram_pj_per_byte": 50.0})
    assert cheaper.energy.dram_pj_per_byte == 50.0
    assert cheaper.energy.mac_pj == base.energy.mac_pj
    assert base.with_overrides(dataflow="is").dataflows == ("ws", "os", "is")
    assert base.with_overrides(double_buffer=False).slots == 1
    with pytest.raises(AccelSpecError, match="overrides of 'edge-32x32': field 'rows'"):
        base.with_overrides(rows=0)
    with pytest.raises(AccelSpecError, match="field 'sram_kib': unknown field"):
        base.with_overrides(sram_kib=64)
