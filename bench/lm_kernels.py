"""Each CPU format of `cpu-linear-formats` against fp32 on SmolLM2-135M's Linear shapes, at 1 input row (a decoding
step at batch 1) and at 128 rows (a 128-token prefill): which kernels are real and fast on this CPU. The weight-only
formats are timed with fp32 and with bf16 activations and scales (the worker's format menu picks one per machine).
Float and low modules timed in paired, interleaved rounds on the same random input, each over copies of its weights
as large as the model's (cold, as the latency profile times them). Writes
bench/results/lm_kernels.{json,md}; the table's first line names the machine.

    .venv/bin/python bench/lm_kernels.py
"""

from __future__ import annotations

from common import SMOKE, engine_process, parser, save

engine_process()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from worker.engine.kernels.linear_formats import low_module  # noqa: E402
from worker.engine.kernels.profile import in_turn, copies_for  # noqa: E402
from worker.engine.latency import paired  # noqa: E402

# (in, out) of SmolLM2-135M's Linear layers: q/o, k/v, gate/up, down projections, and the tied vocabulary head.
SHAPES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (576, 192), "gate_proj, up_proj": (576, 1536),
          "down_proj": (1536, 576), "lm_head": (576, 49152)}
BLOCKS = 30
# SmolLM2-135M's Linear weights in fp32, from the shapes above: each block's layers, and the vocabulary head once.
MODEL_BYTES = 4 * sum((1 if names == "lm_head" else BLOCKS) * len(names.split(", ")) * inputs * outputs
                      for names, (inputs, outputs) in SHAPES.items())
ROWS = (1,) if SMOKE else (1, 128)
ROUNDS, INNER = (3, 1) if SMOKE else (9, None)
# (column, format, activation dtype of the weight-only kernels)
VARIANTS = [("int8", "int8", torch.float32), ("bf16", "bf16", torch.float32),
            ("int8wo (fp32 act.)", "int8wo", torch.float32), ("int8wo (bf16 act.)", "int8wo", torch.bfloat16),
            ("int4wo (fp32 act.)", "int4wo", torch.float32), ("int4wo (bf16 act.)", "int4wo", torch.bfloat16)]
COLUMNS = [name for name, _, _ in VARIANTS]


def main() -> None:
    args = parser(__doc__, "smollm2-135m").parse_args()
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for rows in ROWS:
            for names, (inputs, outputs) in SHAPES.items():
                x = torch.randn(rows, inputs)
                # Cold weights, as the latency profile times them: copies as large as the model's weights, used
                # in turn (one weight timed over and over would run from cache at one row).
                floats = [nn.Linear(inputs, outputs, bias=False) for _ in range(copies_for(inputs * outputs * 4,
                                                                                          MODEL_BYTES))]
                float_call = in_turn(floats)
                row = {"rows": rows, "layers": names, "shape": [inputs, outputs], "us": {}, "copies": len(floats)}
                for column, precision, activations in VARIANTS:
                    low_call = in_turn([low_module(linear, precision, activations) for linear in floats])
                    timing = paired(lambda: float_call(x), lambda: low_call(x), rounds=ROUNDS,
                                    inner=INNER or (20 if rows == 1 else 2))
                    row["us"]["fp32"] = row["us"].get("fp32", []) + [timing.first_ms * 1000]
                    row["us"][column] = timing.second_ms * 1000
                row["us"]["fp32"] = sorted(row["us"]["fp32"])[len(VARIANTS) // 2]  # the median of its pairings
                results.append(row)
                print(row, flush=True)
    lines = ["µs per call (median of paired rounds), 2 threads, each side cycling through copies of its weights as "
             "large as the model's (cold, as in a model's call; capped at 256 MiB); in brackets: time relative to "
             "fp32", "",
             "| input rows | layers (in → out) | fp32 | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for row in results:
        base = row["us"]["fp32"]
        cells = " | ".join(f"{row['us'][p]:,.0f} ({row['us'][p] / base:.1f}×)" for p in COLUMNS)
        lines.append(f"| {row['rows']} | {row['layers']} ({row['shape'][0]} → {row['shape'][1]}) | {base:,.0f} "
                     f"| {cells} |")
    save(args.out, "lm_kernels", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
