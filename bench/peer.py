"""The straightforward Python pipeline that `make bench` measures `augment` against.

Same job as the bench's `peer` configuration: the first N rows of a GLUE split, the original
row plus AugPro-Mix (per-position λ ~ U[λ_min, 1], a random partner) and AugPro-FGSM
(ε·sign of the gradient of the cross-entropy to the gold label), exact L2 projection with
FAISS `IndexFlatL2`, teacher logits for every row, written to Parquet with pyarrow.

Prints one JSON line: seconds of work on the examples and of the whole process.
"""

import json
import sys
import time

START = time.perf_counter()

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


def main(teacher, data, out, n, threads, eps_rel, lambda_min, batch=32, max_len=66):
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    table = model.bert.embeddings.word_embeddings.weight.detach()
    index = faiss.IndexFlatL2(table.shape[1])
    index.add(table.numpy())
    # ε relative to the median nearest-neighbour distance of the table, as augpro does.
    sample = table[torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(0))[:2048]]
    dist, _ = index.search(sample.numpy(), 2)
    eps = eps_rel * float(np.median(np.sqrt(dist[:, 1])))
    special = torch.tensor(tok.all_special_ids)
    src = pq.read_table(data).slice(0, n).to_pylist()
    rng = torch.Generator().manual_seed(0)
    rows = []
    work = time.perf_counter()

    def logits(ids, mask):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    def project(emb, ids, on):
        flat = emb[on].detach().numpy()
        _, nn = index.search(np.ascontiguousarray(flat), 1)
        out = ids.clone()
        out[on] = torch.from_numpy(nn[:, 0]).to(ids.dtype)
        return out

    for b in range(0, len(src), batch):
        part = src[b : b + batch]
        enc = tok([r["sentence"] for r in part], padding=True, truncation=True,
                  max_length=max_len, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        on = (mask == 1) & ~torch.isin(ids, special)
        labels = torch.tensor([r["label"] for r in part])
        emb = model.bert.embeddings.word_embeddings(ids)
        made = {"original": ids}
        # AugPro-Mix
        partner = (torch.arange(len(part)) + torch.randint(1, max(len(part), 2), (len(part),), generator=rng)) % len(part)
        lam = lambda_min + (1 - lambda_min) * torch.rand(ids.shape, generator=rng)
        mixed = lam[..., None] * emb + (1 - lam[..., None]) * emb[partner]
        made["augpro_mix"] = project(mixed, ids, on & (mask[partner] == 1))
        # AugPro-FGSM
        e = emb.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(
            model(inputs_embeds=e, attention_mask=mask).logits, labels)
        (g,) = torch.autograd.grad(loss, e)
        made["augpro_fgsm"] = project(e.detach() + eps * g.sign(), ids, on)
        for method, x in made.items():
            lg = logits(x, mask)
            for i, r in enumerate(part):
                keep = mask[i] == 1
                rows.append({"idx": r["idx"], "method": method, "label": r["label"],
                             "input_ids": x[i][keep].tolist(), "teacher_logits": lg[i].tolist()})
    pq.write_table(pa.Table.from_pylist(rows), out)
    done = time.perf_counter()
    print(json.dumps({"examples": len(src), "rows": len(rows), "work_seconds": done - work,
                      "process_seconds": done - START}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), int(a[4]), float(a[5]), float(a[6]))
