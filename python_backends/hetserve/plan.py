"""``hetserve plan``: what homogeneous and split configurations cost, from measurements.

Reads a price table (YAML: device -> $/hour, each with its source) and the
tier measurements ``hetserve bench tiers`` wrote (``tiers-<device>-<model>.json``:
prefill prompt tokens/s and decode output tokens/s of one device), and prints,
for a workload of P prompt tokens and O output tokens per request:

* **homogeneous** (one device kind does both, time-shared): a request takes
  ``P / prefill_rate + O / decode_rate`` device-seconds;
* **split** (prefill on A, decode on B): a balanced unit is one B and the
  fraction of an A that keeps it fed, ``(P / prefill_rate_A) / (O / decode_rate_B)``.

For each: output tokens/s (of one device, or of one balanced unit), $/hour and
$ per million output tokens. Every number comes from the files; a device with
a price but no measurement, or a measurement but no price, is named, never
guessed. Not modelled: interference between prefill and decode on one
device, and the KV transfer between devices (measure it: ``hetserve bench kv``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@dataclass(frozen=True, slots=True)
class Tiers:
    """One device's measured rates for one model."""

    device: str
    model: str
    prefill_tokens_per_s: float  # prompt tokens
    decode_tokens_per_s: float  # output tokens
    source: str


@dataclass(frozen=True, slots=True)
class Row:
    config: str  # "homogeneous" or "split"
    prefill_device: str
    decode_device: str
    output_tokens_per_s: float
    prefill_devices_per_decode_device: float
    usd_per_hour: float
    usd_per_million_output_tokens: float


def load_prices(path: Path) -> dict[str, float]:
    """{device: $/hour}; every entry must name its source."""
    table = yaml.safe_load(path.read_text()) or {}
    prices = {}
    for device, entry in (table.get("devices") or {}).items():
        if not isinstance(entry, dict) or "usd_per_hour" not in entry:
            raise ValueError(f"{path}: device {device!r} has no usd_per_hour")
        if not entry.get("source"):
            raise ValueError(f"{path}: device {device!r} names no source for its price")
        prices[device] = float(entry["usd_per_hour"])
    return prices


def load_results(directory: Path, model: str | None) -> dict[str, Tiers]:
    """{device: Tiers} from ``tiers-*.json``; the latest measurement per device wins."""
    found: dict[str, tuple[str, Tiers]] = {}
    models = set()
    for path in sorted(directory.glob("tiers-*.json")):
        record = json.loads(path.read_text())
        models.add(record["model"])
        if model is not None and record["model"] != model:
            continue
        tiers = Tiers(
            record["device"], record["model"],
            float(record["prefill"]["prompt_tokens_per_s"]), float(record["decode"]["output_tokens_per_s"]), path.name,
        )
        when = record.get("measured_at", "")
        if record["device"] not in found or when >= found[record["device"]][0]:
            found[record["device"]] = (when, tiers)
    if model is None and len(models) > 1:
        raise ValueError(f"{directory} holds measurements of several models ({', '.join(sorted(models))}): choose one with --model")
    return {device: tiers for device, (_, tiers) in found.items()}


def plan(results: dict[str, Tiers], prices: dict[str, float], prompt_tokens: int, output_tokens: int) -> list[Row]:
    """Every homogeneous and split configuration of the devices both measured and priced, cheapest first."""
    usable = sorted(set(results) & set(prices))
    rows = []
    for a in usable:  # prefill
        prefill_s = prompt_tokens / results[a].prefill_tokens_per_s
        for b in usable:  # decode
            decode_s = output_tokens / results[b].decode_tokens_per_s
            usd_per_request = (prefill_s * prices[a] + decode_s * prices[b]) / 3600
            if a == b:
                rows.append(Row("homogeneous", a, b, output_tokens / (prefill_s + decode_s), 0.0, prices[a],
                                usd_per_request / output_tokens * 1e6))
            else:
                share = prefill_s / decode_s
                rows.append(Row("split", a, b, output_tokens / decode_s, share, prices[b] + share * prices[a],
                                usd_per_request / output_tokens * 1e6))
    return sorted(rows, key=lambda r: r.usd_per_million_output_tokens)


def gaps(results: dict[str, Tiers], prices: dict[str, float]) -> list[str]:
    """What the plan leaves out, and why."""
    notes = [f"{d}: priced, never measured (run hetserve bench tiers --device {d} on one)" for d in sorted(set(prices) - set(results))]
    notes += [f"{d}: measured ({results[d].source}), not in the price table" for d in sorted(set(results) - set(prices))]
    return notes


def render(rows: list[Row]) -> str:
    lines = [f"{'configuration':<34} {'tokens/s':>10} {'$/hour':>9} {'$/M tokens':>11}"]
    for r in rows:
        name = f"{r.prefill_device} (both)" if r.config == "homogeneous" else f"{r.prefill_device} -> {r.decode_device}"
        if r.config == "split":
            name += f" [{r.prefill_devices_per_decode_device:.2f}:1]"
        lines.append(f"{name:<34} {r.output_tokens_per_s:>10.1f} {r.usd_per_hour:>9.3f} {r.usd_per_million_output_tokens:>11.3f}")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.prefill_device} (both)" if r.config == "homogeneous" else f"{r.prefill_device} → {r.decode_device}" for r in rows]
    colours = ["tab:grey" if r.config == "homogeneous" else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    ax.barh(labels[::-1], [r.usd_per_million_output_tokens for r in rows][::-1], color=colours[::-1])
    ax.set_xlabel("$ per million output tokens (measured rates, balanced pools)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens, at least 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetserve plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prices", type=Path, required=True, help="YAML price table (e.g. docker/prices.example.yaml)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where hetserve bench tiers wrote its files")
    parser.add_argument("--model", help="the measured model to plan for (needed when the results hold several)")
    parser.add_argument("--prompt-tokens", type=_positive, default=512)
    parser.add_argument("--output-tokens", type=_positive, default=128)
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        prices = load_prices(args.prices)
        results = load_results(args.results, args.model)
    except (OSError, ValueError, KeyError) as exc:
        print(f"hetserve plan: {exc}", file=sys.stderr)
        return 2
    rows = plan(results, prices, args.prompt_tokens, args.output_tokens)
    model = next(iter(results.values())).model if results else args.model or "?"
    print(f"{model}: {args.prompt_tokens} prompt tokens, {args.output_tokens} output tokens per request")
    print(render(rows) if rows else "no device is both measured and priced")
    for note in gaps(results, prices):
        print("not planned: " + note)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if args.plot and rows:
        plot(rows, args.plot, f"{model}, {args.prompt_tokens} in / {args.output_tokens} out")
        print(f"plot: {args.plot}")
    return 0 if rows else 1
