"""Turn the benchmark JSON files into docs/benchmarks.md and a bar chart.

python benchmarks/report.py   # reads docs/benchmarks/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from _common import REPO

KERAS = "Keras/TensorFlow fp32 (recipe)"
INT8 = "ONNX Runtime int8 (static QDQ)"
KERAS_TRAINING = "Keras/TensorFlow frozen-base loop (recipe)"


def _machine(machine: dict) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores ({', '.join(machine['simd'])}); "
        f"torch {machine['torch']}, ONNX Runtime {machine['onnxruntime']}; commit "
        f"{machine['commit']}, {machine['date']}"
    )


def inference_section(result: dict, figure: Path) -> list[str]:
    rates, batches = result["img_per_s"], [str(b) for b in result["batch_sizes"]]
    base_name = KERAS if KERAS in rates else next(iter(rates))
    header = " | ".join(f"batch {b}" for b in batches)
    lines = [
        "## Inference",
        "",
        f"Images per second at {result['image_size']}x{result['image_size']}, higher is better;"
        f" in brackets the ratio to {base_name}. Machine: {_machine(result['machine'])}.",
        "",
        f"| backend | {header} |",
        "|---|" + "---|" * len(batches),
    ]
    for name, row in rates.items():
        cells = [f"{row[b]:.1f} ({row[b] / rates[base_name][b]:.2f}x)" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    compiled = rates.get("torch.compile fp32 channels_last", {}).get("first_call_seconds")
    if compiled is not None:
        lines += ["", f"torch.compile's first call (compilation) took {compiled:.0f} s."]
    if not any("bf16" in name for name in rates):
        lines += ["", "bf16 is not measured: this CPU has no native bf16 (avx512_bf16 / amx)."]
    if KERAS in rates and INT8 in rates and "8" in batches:
        ratio = rates[INT8]["8"] / rates[KERAS]["8"]
        verdict = "met" if ratio >= 3.5 else "not met on this CPU"
        lines += ["", f"Target int8 >= 3.5x Keras at batch 8: **{ratio:.2f}x**, {verdict}."]

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rates)))
    names = list(rates)
    for offset, batch in enumerate(batches):
        ax.barh(
            [i + 0.25 * (offset - 1) for i in range(len(names))],
            [rates[n][batch] for n in names],
            height=0.25,
            label=f"batch {batch}",
        )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("images / second (higher is better)")
    ax.legend(loc="upper right")
    ax.set_title("VGG16 recipe inference on this CPU")
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    return [*lines, "", f"![inference throughput](figures/{figure.name})", ""]


def training_section(result: dict) -> list[str]:
    seconds = result["seconds"]
    eager_rows = {name: value for name, value in seconds.items() if "eager" in name}
    eager_name, eager = next(iter(eager_rows.items()))  # 0 workers, fp32: the plain loop
    lines = [
        "## Training",
        "",
        f"Wall time of the default recipe, {result['epochs']} epochs, on a stratified subset of"
        f" {result['train_images']} training + {result['val_images']} validation BUSI images"
        f" (benign vs malignant), lower is better. Machine: {_machine(result['machine'])}.",
        "",
        f"| loop | seconds | speed-up vs {eager_name} |",
        "|---|---|---|",
    ]
    for name, value in seconds.items():
        lines.append(f"| {name} | {value:.0f} | {eager / value:.1f}x |")
    if KERAS_TRAINING in seconds:
        fastest_name, fastest = min(eager_rows.items(), key=lambda item: item[1])
        ratio = seconds[KERAS_TRAINING] / fastest
        verdict = "met" if ratio >= 1.5 else "not met"
        lines += ["", f"Target: the recipe trained eagerly (fresh augmentation every epoch, no "
                  f"cache) >= 1.5x faster than Keras: **{ratio:.2f}x** ({fastest_name}), "
                  f"{verdict}."]  # fmt: skip
    cold = next(v for k, v in seconds.items() if "cold" in k)
    verdict = "met" if eager / cold >= 10 else "not met"
    views = result.get("cache_views", 5)
    train, val, epochs = result["train_images"], result["val_images"], result["epochs"]
    eager_passes, cached_passes = epochs * train + val, views * train + val
    lines += ["", f"Target cached >= 10x faster than the eager loop end to end (cold cache): "
              f"**{eager / cold:.1f}x**, {verdict}. A cold cache runs the frozen base over "
              f"{views} views x {train} + {val} = {cached_passes} images, the eager loop over "
              f"{epochs} x {train} + {val} = {eager_passes}: at most "
              f"{eager_passes / cached_passes:.1f}x fewer passes. The warm cache is what a second "
              "run or the other folds of a cross-validation see.", ""]  # fmt: skip
    return lines


def scaling_section(result: dict) -> list[str]:
    lines = ["## Keeping the device fed, and scaling out", ""]
    predict = result.get("predict")
    if predict:
        workers, default = predict["workers"], predict["default_workers"]
        lines += [
            f"Images per second on {result['device']} ({result['run']}, batch "
            f"{predict['batch_size']}, {predict['images']} synthetic 256x256 PNGs; torch rows on "
            f"half of them): the model alone on a preprocessed batch in memory, and end to end "
            f"(files on disk -> decode, preprocess, scope checks, score -> CSV) with 0 and "
            f"{workers} loader worker(s); in brackets the share of the model-only rate. The "
            f"default here (auto) is {default} worker(s). Machine: "
            f"{_machine(predict['machine'])}.",
            "",
            f"| model | model only | end to end, 0 workers | end to end, {workers} worker(s) |",
            "|---|---|---|---|",
        ]
        for name, row in predict["img_per_s"].items():
            cells = [f"{row[f'end_to_end_{n}_workers']:.1f} "
                     f"({row[f'end_to_end_{n}_workers'] / row['model_only']:.0%})"
                     for n in (0, workers)]  # fmt: skip
            lines.append(f"| {name} | {row['model_only']:.1f} | " + " | ".join(cells) + " |")
        int8 = predict["img_per_s"].get("ONNX Runtime int8")
        if int8:
            share = int8[f"end_to_end_{default}_workers"] / int8["model_only"]
            verdict = "met" if share >= 0.8 else "not met"
            lines += ["", f"Target `predict --backend onnx` end to end (default workers) >= 80% "
                      f"of the int8 model-only rate: **{share:.0%}**, {verdict}."]  # fmt: skip
        lines.append("")
    ddp = result.get("ddp")
    if ddp:
        runs = ddp["runs"]
        one = runs["1 process(es)"]["mean_epoch_seconds_after_the_first"]
        lines += [
            f"Training epochs of the default recipe on {ddp['train_images']} BUSI training "
            f"images, one process against `torchrun --nproc-per-node 2` (gloo), mean of epochs "
            f"2-{ddp['epochs']} (the first fills the loaders). Machine: "
            f"{_machine(ddp['machine'])}.",
            "",
            "| processes | seconds per epoch | speed-up | whole command (s) |",
            "|---|---|---|---|",
        ]
        for name, row in runs.items():
            epoch = row["mean_epoch_seconds_after_the_first"]
            lines.append(f"| {name} | {epoch:.1f} | {one / epoch:.2f}x | "
                         f"{row['command_seconds']:.0f} |")  # fmt: skip
        lines.append("")
    ray = result.get("ray")
    if ray:
        runs = ray["runs"]
        one = runs["1 actor(s)"]["img_per_s"]
        lines += [
            f"`busdx predict --ray` on a local Ray instance, {ray['images']} synthetic PNGs, "
            f"model {', '.join(ray['model'])} (the int8 one is used), Ray's start included. "
            f"Machine: {_machine(ray['machine'])}.",
            "",
            "| model actors | img/s | speed-up | seconds |",
            "|---|---|---|---|",
        ]
        for name, row in runs.items():
            lines.append(f"| {name} | {row['img_per_s']:.1f} | {row['img_per_s'] / one:.2f}x | "
                         f"{row['seconds_with_ray_start']:.0f} |")  # fmt: skip
        lines.append("")
    return lines


def memory_section(result: dict) -> list[str]:
    lines = [
        "## Predict memory",
        "",
        f"Peak resident memory of one `busdx predict --backend {result['backend']}` process over"
        f" a folder of N images (batch {result['batch_size']}). Machine: "
        f"{_machine(result['machine'])}.",
        "",
        "| images | peak RSS (MB) | wall time (s) | img/s |",
        "|---|---|---|---|",
    ]
    for row in result["runs"]:
        rate = row["images"] / row["seconds"]
        lines.append(f"| {row['images']} | {row['peak_rss_mb']} | {row['seconds']} | {rate:.1f} |")
    peaks = [row["peak_rss_mb"] for row in result["runs"]]
    growth = result["runs"][-1]["images"] / result["runs"][0]["images"]
    lines += ["", f"Largest / smallest peak: {max(peaks) / min(peaks):.2f}x for {growth:.0f}x "
              "the images.", ""]  # fmt: skip
    return lines


def load_section(result: dict) -> list[str]:
    return [
        "## Serving under load",
        "",
        f"`busdx serve` ({result['backend']} backend) on loopback, {result['requests']} POST "
        f"/predict requests (one 256x256 PNG each), {result['concurrency']} in flight "
        f"(`benchmarks/load_test.py`). Machine: {_machine(result['machine'])}.",
        "",
        "| p50 | p90 | p99 | max | requests/s | errors | server exit after SIGINT |",
        "|---|---|---|---|---|---|---|",
        f"| {result['p50_ms']:.0f} ms | {result['p90_ms']:.0f} ms | {result['p99_ms']:.0f} ms | "
        f"{result['max_ms']:.0f} ms | {result['requests_per_s']:.2f} | {result['errors']} | "
        f"{result['server_exit_code']} |",
        "",
        "With one model worker, requests queue: latency is mostly waiting time, about "
        "concurrency x the time of one prediction.",
        "",
    ]


def soak_section(result: dict, figure: Path) -> list[str]:
    done, rss = zip(*result["rss_mb_every_100"], strict=True)
    plt.figure(figsize=(6, 3))
    plt.plot(done, rss, marker=".")
    plt.axvline(200, color="grey", linestyle=":", label="growth measured from here")
    plt.xlabel("requests answered")
    plt.ylabel("server RSS (MB)")
    plt.title(f"busdx serve soak, {result['backend']} backend")
    plt.legend()
    plt.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    plt.savefig(figure, dpi=120)
    plt.close()
    return [
        "## Soak: good and bad uploads mixed",
        "",
        f"`busdx serve` ({result['backend']} backend) on loopback, {result['requests']} POST "
        f"/predict requests, {result['concurrency']} in flight: {result['good_requests']} with a "
        f"256x256 PNG, {result['bad_requests']} with a bad upload in turn (zero bytes, text, a "
        "truncated PNG, a 30000 x 30000 decompression bomb, a 21 MB body over the 20 MB limit), "
        "each of which must get its 4xx `{error, detail}` answer "
        f"(`benchmarks/load_test.py --bad-share`). Machine: {_machine(result['machine'])}.",
        "",
        "| errors (a 5xx, or a wrong status or body) | server RSS growth from request 200 to "
        "the last | p50 | p99 | requests/s | server exit after SIGINT |",
        "|---|---|---|---|---|---|",
        f"| {result['errors']} | {result['rss_growth_mb_from_200']:+.1f} MB (budget < 100 MB; "
        f"{rss[0]:.0f} MB at request {done[0]}, {rss[-1]:.0f} MB at {done[-1]}) | "
        f"{result['p50_ms']:.0f} ms | {result['p99_ms']:.0f} ms | "
        f"{result['requests_per_s']:.2f} | {result['server_exit_code']} |",
        "",
        f"![server memory during the soak](figures/{figure.name})",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "docs" / "benchmarks"))
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    folder, out = Path(args.results), Path(args.out)
    commands = (folder / "commands.md").read_text() if (folder / "commands.md").is_file() else ""
    intro = ("Generated by `python benchmarks/report.py` from the JSON files in docs/benchmarks/;"
             " each table was measured in one run on one machine.")  # fmt: skip
    lines = ["# Benchmarks", "", intro, ""]
    sections = {
        "inference.json": lambda r: inference_section(r, out.parent / "figures" / "inference.png"),
        "training.json": training_section,
        "predict_memory.json": memory_section,
        "load_test.json": load_section,
        "soak_test.json": lambda r: soak_section(r, out.parent / "figures" / "soak.png"),
        "scaling.json": scaling_section,
    }
    for name, section in sections.items():
        if (folder / name).is_file():
            lines += section(json.loads((folder / name).read_text()))
    out.write_text("\n".join([*lines, commands]), encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
