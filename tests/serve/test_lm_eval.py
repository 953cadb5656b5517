"""lm-evaluation-harness's ``local-completions`` model scores a loglikelihood task against
the running server (tokenizing through the server's /tokenize), and the log-probabilities
equal ``minigpt eval``'s on the same text."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

DOCS = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is it.",
        "Hello world, hello server."]


def test_lm_eval_local_completions_matches_minigpt_eval(server, cli, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    # context: the first character; continuation: the rest, so the continuation's
    # log-probability is the whole text's, which is what `minigpt eval` scores
    data.write_text("".join(json.dumps({"context": d[0], "continuation": d[1:]}) + "\n"
                            for d in DOCS))
    (tmp_path / "toy_ll.yaml").write_text(f"""
task: minigpt_toy_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model={server.model_id},"
                   f"tokenizer_backend=remote,auth_token={server.api_key},"
                   "num_concurrent=2,max_retries=1,tokenized_requests=True",
        tasks=["minigpt_toy_ll"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True, limit=None)
    samples = sorted(out["samples"]["minigpt_toy_ll"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for doc, sample in zip(DOCS, samples, strict=True):
        ll = float(sample["filtered_resps"][0][0])
        text = tmp_path / f"doc{sample['doc_id']}.txt"
        text.write_text(doc)
        report = cli.ok_json("eval", "--model", server.run_dir, "--text-file", text,
                             "--device", "cpu", "--precision", "fp32", "--json")
        tokens = len(doc.encode("utf-8")) - 1  # byte tokens scored after the first
        assert report["tokens"] == tokens, report
        assert abs(-ll / tokens - report["loss"]) < 1e-4, (ll, report)
