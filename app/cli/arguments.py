"""Argument types and the job-request flags that `compress` and `submit` share: one vocabulary, the API's."""

from __future__ import annotations

import argparse

from worker.engine.search import DEFAULT_CONFIDENCE


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="hf:<repo_id>[@revision], local:<dir under MIXQ_MODEL_ROOT> or builtin:<name>")
    parser.add_argument("--budget", type=number, required=True,
                        help="largest allowed metric drop, in (0, 1): 0.01 = 1%% of the baseline (relative)")
    parser.add_argument("--min-drop", type=number, default=0.0,
                        help="lower edge of the degradation range: stop searching once a drop lands in [min, budget]")
    parser.add_argument("--absolute", action="store_true", help="budget in absolute metric points, not relative")
    parser.add_argument("--confidence", type=number, default=DEFAULT_CONFIDENCE,
                        help="the one-sided level of each plan's acceptance test, drop + z*SE <= budget (0.5: on the "
                             "drop alone; default %(default)s). It bounds one plan's expected drop, not how often the "
                             "returned plan holds on new data (bench/confidence.py measures that)")
    parser.add_argument("--ordering", choices=["augmented", "hessian", "random"], default="augmented")
    parser.add_argument("--selection", choices=["cost-aware", "sensitivity"], default="cost-aware",
                        help="order layers by accuracy cost per millisecond saved (cost-aware) or by sensitivity")
    parser.add_argument("--interlayer", choices=["conditional", "pairwise"], default="conditional",
                        help="which measured inter-layer dependency term augments the Hessian")
    parser.add_argument("--analysis-loss", choices=["fidelity", "task"], default="fidelity",
                        help="what a labelled classifier's layers are scored on: KL to the float model (fidelity) or "
                             "the labels' cross-entropy (task); the budget stays on the metric")
    parser.add_argument("--hutchinson-samples", type=positive_int, default=16,
                        help="cap on Hutchinson samples (at least 2)")
    parser.add_argument("--data", help="HF dataset ID (hf:name[@config]) or a file/folder under MIXQ_MODEL_ROOT")
    parser.add_argument("--split", default="train", help="dataset split (HF datasets)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--synthetic-data", action="store_true", help="random inputs (latency work only)")
    parser.add_argument("--calibration-samples", type=positive_int, default=128)
    parser.add_argument("--eval-samples", type=positive_int, default=256)
    parser.add_argument("--test-samples", type=positive_int, default=256,
                        help="held out from every decision; scores the final plan once")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--priority", type=int, default=5, help="0-9, higher runs first (service jobs)")
    parser.add_argument("--runtime", choices=["torch", "onnxruntime", "llama.cpp"], default="torch",
                        help="where every plan is evaluated, timed and delivered (onnxruntime or llama.cpp: the search "
                             "runs in the runtime you deploy, and the artifact is its ONNX or GGUF file; llama.cpp "
                             "takes causal language models read from a GGUF file)")
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=None,
                        help="comma-separated low precisions a plan may mix per layer: int8, int8wo, int4wo, bf16 (CPU), "
                             "or fp8 alone (GPU), or GGML types with --runtime llama.cpp (F16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, "
                             "Q4_0: each offered where this CPU runs it faster); default: the worker's measured menu (int8, and int8,int8wo,int4wo "
                             "for causal language models, each with bf16 where this CPU runs it natively)")
    parser.add_argument("--baseline", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="the float execution a plan must beat on latency; auto: the fastest float this machine "
                             "runs natively, measured (accuracy is always against the model as given)")
    parser.add_argument("--latency", choices=["decode", "prefill"], default=None,
                        help="a causal language model's speed to optimise: one decoding step (tokens/s, the default) "
                             "or the prefill of a --seq-len prompt (time to first token)")
    parser.add_argument("--export", choices=["onnx", "none"], default=None,
                        help="also write model.onnx, quantized by onnxruntime and measured there (service jobs: "
                             "onnx unless none; mixq compress: only when asked, with --out)")


def job_request(args) -> dict:
    """The flags as a job request, in the API's vocabulary (unvalidated)."""
    data = None
    if args.data or args.synthetic_data:
        data = {"spec": args.data, "split": args.split, "text_column": args.text_column,
                "label_column": args.label_column or None, "image_column": args.image_column,
                "synthetic": args.synthetic_data}
    return {"model": args.source, "budget": {"max_drop": args.budget, "min_drop": args.min_drop,
                                             "mode": "absolute" if args.absolute else "relative",
                                             "confidence": args.confidence},
            "ordering": args.ordering, "selection": args.selection, "interlayer": args.interlayer,
            "analysis_loss": args.analysis_loss, "runtime": args.runtime, "baseline": args.baseline,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "calibration_samples": args.calibration_samples,
            "eval_samples": args.eval_samples, "test_samples": args.test_samples,
            "hutchinson_samples": args.hutchinson_samples, "priority": args.priority, "data": data,
            **({} if args.precisions is None else {"precisions": args.precisions}),
            **({} if args.latency is None else {"latency": args.latency}),
            **({} if args.export is None else {"exports": [] if args.export == "none" else [args.export]})}
