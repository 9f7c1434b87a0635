"""hetserve plan on a small results fixture, checked against a table computed here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetserve.plan import main

ROOT = Path(__file__).resolve().parents[2]
P, O = 512, 128

# Measured rates (prompt tokens/s, output tokens/s) and prices ($/hour) of the fixture.
RATES = {"cpu-a": (1000.0, 200.0), "gpu-b": (40000.0, 800.0), "cpu-c": (500.0, 100.0)}
PRICES = {"cpu-a": 0.10, "gpu-b": 4.00, "gpu-z": 9.00}  # cpu-c: no price; gpu-z: never measured


def write_results(directory: Path) -> None:
    directory.mkdir()
    for device, (prefill, decode) in RATES.items():
        record = {"device": device, "model": "m", "measured_at": "2026-11-29T10:00:00+00:00",
                  "prefill": {"prompt_tokens_per_s": prefill}, "decode": {"output_tokens_per_s": decode}}
        (directory / f"tiers-{device}-m.json").write_text(json.dumps(record))
    older = {"device": "cpu-a", "model": "m", "measured_at": "2026-01-01T00:00:00+00:00",
             "prefill": {"prompt_tokens_per_s": 1.0}, "decode": {"output_tokens_per_s": 1.0}}
    (directory / "tiers-cpu-a-m-old.json").write_text(json.dumps(older))  # the latest measurement wins


def write_prices(path: Path, prices=PRICES) -> None:
    lines = ["devices:"]
    for device, price in prices.items():
        lines += [f"  {device}:", f"    usd_per_hour: {price}", "    source: https://example.com/pricing"]
    path.write_text("\n".join(lines) + "\n")


def expected() -> dict[tuple[str, str], tuple[float, float, float]]:
    """(prefill device, decode device) -> (tokens/s, $/hour, $/M tokens), worked out by hand here."""
    a_pre, a_dec = P / 1000.0, O / 200.0  # cpu-a: 0.512 s and 0.64 s per request
    b_pre, b_dec = P / 40000.0, O / 800.0  # gpu-b: 0.0128 s and 0.16 s
    table = {}
    # Homogeneous: one device serves a request in prefill + decode seconds.
    table[("cpu-a", "cpu-a")] = (O / (a_pre + a_dec), 0.10, 0.10 * (a_pre + a_dec) / 3600 / O * 1e6)
    table[("gpu-b", "gpu-b")] = (O / (b_pre + b_dec), 4.00, 4.00 * (b_pre + b_dec) / 3600 / O * 1e6)
    # Split: one decode device at its rate; the prefill device busy prefill/decode of the time.
    table[("gpu-b", "cpu-a")] = (200.0, 0.10 + (b_pre / a_dec) * 4.00, (b_pre * 4.00 + a_dec * 0.10) / 3600 / O * 1e6)
    table[("cpu-a", "gpu-b")] = (800.0, 4.00 + (a_pre / b_dec) * 0.10, (a_pre * 0.10 + b_dec * 4.00) / 3600 / O * 1e6)
    return table


def test_plan_matches_a_table_worked_out_by_hand(tmp_path, capsys):
    write_results(tmp_path / "results")
    write_prices(tmp_path / "prices.yaml")
    out_json, png = tmp_path / "plan.json", tmp_path / "plan.png"
    code = main(["--prices", str(tmp_path / "prices.yaml"), "--results", str(tmp_path / "results"),
                 "--prompt-tokens", str(P), "--output-tokens", str(O), "--json", str(out_json), "--plot", str(png)])
    assert code == 0
    rows = json.loads(out_json.read_text())
    got = {(r["prefill_device"], r["decode_device"]): (r["output_tokens_per_s"], r["usd_per_hour"], r["usd_per_million_output_tokens"]) for r in rows}
    want = expected()
    assert got.keys() == want.keys()  # cpu-c (no price) and gpu-z (not measured) are left out
    for key, values in want.items():
        assert got[key] == pytest.approx(values, rel=1e-9), key
    assert [r["usd_per_million_output_tokens"] for r in rows] == sorted(r["usd_per_million_output_tokens"] for r in rows)
    printed = capsys.readouterr().out
    assert "not planned: gpu-z: priced, never measured" in printed
    assert "not planned: cpu-c: measured (tiers-cpu-c-m.json), not in the price table" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_price_without_source_or_a_mixed_results_folder_is_refused(tmp_path, capsys):
    write_results(tmp_path / "results")
    (tmp_path / "nosource.yaml").write_text("devices:\n  cpu-a:\n    usd_per_hour: 0.1\n")
    assert main(["--prices", str(tmp_path / "nosource.yaml"), "--results", str(tmp_path / "results")]) == 2
    assert "cpu-a' names no source" in capsys.readouterr().err
    other = {"device": "cpu-a", "model": "other", "prefill": {"prompt_tokens_per_s": 1}, "decode": {"output_tokens_per_s": 1}}
    (tmp_path / "results" / "tiers-cpu-a-other.json").write_text(json.dumps(other))
    write_prices(tmp_path / "prices.yaml")
    assert main(["--prices", str(tmp_path / "prices.yaml"), "--results", str(tmp_path / "results")]) == 2
    assert "several models (m, other): choose one with --model" in capsys.readouterr().err
    assert main(["--prices", str(tmp_path / "prices.yaml"), "--results", str(tmp_path / "results"), "--model", "m"]) == 0


def test_the_example_price_table_loads_and_names_its_sources():
    from hetserve.plan import load_prices

    prices = load_prices(ROOT / "docker" / "prices.example.yaml")
    assert prices and all(p > 0 for p in prices.values())


def test_hetserve_plan_on_the_command_line(tmp_path, capsys):
    from hetserve.cli import main as hetserve

    write_results(tmp_path / "results")
    write_prices(tmp_path / "prices.yaml")
    assert hetserve(["plan", "--prices", str(tmp_path / "prices.yaml"), "--results", str(tmp_path / "results")]) == 0
    assert "gpu-b -> cpu-a [0.02:1]" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--prompt-tokens", "--output-tokens"])
def test_token_counts_below_one_are_refused(tmp_path, capsys, flag):
    from hetserve.cli import main as hetserve

    write_prices(tmp_path / "prices.yaml")
    with pytest.raises(SystemExit) as exit_:
        hetserve(["plan", "--prices", str(tmp_path / "prices.yaml"), flag, "-5"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a whole number of tokens, at least 1, got -5" in capsys.readouterr().err
