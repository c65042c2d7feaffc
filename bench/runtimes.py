"""The teacher's forward on the runtimes a user would pick for a CPU encoder, for the
`teacher` section of `make bench`: PyTorch eager (forward, and forward + backward to the
embeddings), ONNX Runtime fp32 (graph optimisations on) and ONNX Runtime with dynamic int8
quantisation of the weights.

Usage: runtimes.py MODEL_DIR BATCHES_JSON WORK_DIR THREADS PASSES

BATCHES_JSON holds the exact batches the engine runs: {"batches": [{"ids": [[...], ...],
"types": [[...], ...], "labels": [...]}, ...]}, sequences unpadded, batches sorted by length.
Each batch is padded to its longest sequence. The classification head is seeded (throughput
does not depend on its weights). Prints one JSON line: per runtime and pass the best of
PASSES timings in seconds and the real tokens per second.
"""

import json
import sys
import time
import warnings

import numpy as np
import torch


def padded(batch):
    n = max(len(s) for s in batch["ids"])
    ids = np.zeros((len(batch["ids"]), n), dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for i, (s, t) in enumerate(zip(batch["ids"], batch["types"])):
        ids[i, : len(s)] = s
        types[i, : len(t)] = t
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def export(model, path):
    ids = torch.ones(2, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, ids, torch.zeros_like(ids)),
            path,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={k: {0: "batch", 1: "seq"} for k in names},
            opset_version=17,
            dynamo=False,
        )


def best_of(passes, run):
    return min(timed(run) for _ in range(passes))


def timed(run):
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main(model_dir, batches_json, work_dir, threads, passes):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batches = json.load(open(batches_json))["batches"]
    inputs = [padded(b) for b in batches]
    tokens = sum(len(s) for b in batches for s in b["ids"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()

    def torch_forward():
        with torch.no_grad():
            for x in inputs:
                model(**{k: torch.from_numpy(v) for k, v in x.items()}).logits.numpy()

    emb = model.get_input_embeddings()

    def torch_backward():
        for x, b in zip(inputs, batches):
            e = emb(torch.from_numpy(x["input_ids"])).detach().requires_grad_(True)
            out = model(
                inputs_embeds=e,
                attention_mask=torch.from_numpy(x["attention_mask"]),
                token_type_ids=torch.from_numpy(x["token_type_ids"]),
            )
            y = torch.tensor(b["labels"], dtype=torch.long)
            torch.nn.functional.cross_entropy(out.logits, y).backward()
            e.grad.sum().item()

    fp32 = f"{work_dir}/teacher.onnx"
    int8 = f"{work_dir}/teacher-int8.onnx"
    export(model, fp32)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def ort_forward(path):
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return lambda: [s.run(None, x) for x in inputs]

    runs = [
        ("PyTorch eager, f32", "forward", torch_forward),
        ("PyTorch eager, f32", "forward + backward to embeddings", torch_backward),
        ("ONNX Runtime, f32", "forward", ort_forward(fp32)),
        ("ONNX Runtime, dynamic int8", "forward", ort_forward(int8)),
    ]
    rows = []
    for engine, pass_, run in runs:
        run()  # warm-up
        t = best_of(passes, run)
        rows.append({"engine": engine, "pass": pass_, "seconds": t, "real_tokens_per_s": tokens / t})
    versions = {"torch": torch.__version__, "onnxruntime": ort.__version__}
    print(json.dumps({"real_tokens": tokens, "versions": versions, "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
