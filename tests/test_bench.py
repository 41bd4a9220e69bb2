"""`propd bench`: the suite's report, table, plot and BENCHMARKS.md section (tiny random models),
and the CI smoke run of `propd bench --quick` on the embedded model (losslessness only, never speed)."""
import json

import pytest

from propd_compile import bench
from propd_compile.bench import Method, Prompt
from propd_compile.cli import main
from models_tiny import tiny_model

MAX_NEW = 12
METHODS = {
    "hf": bench.METHODS["hf"],
    "hf-lookup": bench.METHODS["hf-lookup"],
    "ngram": bench.METHODS["ngram"],
    "medusa": bench.METHODS["medusa"],  # no heads for a random model: unavailable, with the reason
    "future": Method("a feature ProPDConfig does not have", propd={"no_such_field": True}),
}


def _prompts() -> list[Prompt]:
    rows = [[1, 7, 9, 11, 7, 9], [1, 3, 4, 3, 4, 3, 4], [1, 20, 21, 22, 23, 20, 21], [1, 8, 8, 8]]
    return [Prompt(("writing", "math")[i % 2], 1, tuple(r)) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def report():
    return bench.run(tiny_model("llama"), _prompts(), methods=METHODS, batch_sizes=(1, 2), max_new_tokens=MAX_NEW,
                     repeats=2, progress=False)


def _row(report, method, bs):
    return next(r for r in report["results"] if r["method"] == method and r["batch_size"] == bs)


def test_every_method_has_a_row_with_its_status(report):
    assert [(r["method"], r["batch_size"]) for r in report["results"]] == [(m, b) for m in METHODS for b in (1, 2)]
    status = {m: info["status"] for m, info in report["methods"].items()}
    assert status["hf"] == status["ngram"] == status["hf-lookup"] == "ok"
    assert status["medusa"].startswith("unavailable: ValueError") and "heads" in status["medusa"]
    assert status["future"].startswith("unavailable: TypeError") and "no_such_field" in status["future"]
    assert _row(report, "future", 1) == {"method": "future", "batch_size": 1, "status": status["future"]}
    assert _row(report, "hf-lookup", 1)["status"] == "ok"  # HF's assisted generate takes batch 1 only:
    assert _row(report, "hf-lookup", 2)["status"] == "unavailable: batch size > 1"
    json.dumps(report)  # JSON-ready as is


def test_numbers_per_method_batch_and_category(report):
    for bs in (1, 2):
        hf, ngram = _row(report, "hf", bs), _row(report, "ngram", bs)
        assert hf["speedup_vs_hf"] == 1.0 and hf["mean_accepted"] is None and hf["tree_sizes"] is None
        assert ngram["identical_rate"] == 1.0 and ngram["rows"] == 2 * len(_prompts())  # 2 repeats
        assert ngram["mean_accepted"] >= 1.0 and ngram["tokens_per_second"] > 0 and len(ngram["seconds"]) == 2
        t = ngram["tree_sizes"]
        assert 1 <= t["p10"] <= t["p50"] <= t["p90"] <= t["max"] and 1 <= t["mean"] <= t["max"]
        assert sum(ngram["tree_size_histogram"].values()) > 0
        assert set(ngram["per_category"]) == {"writing", "math"}
        for cat in ngram["per_category"].values():
            assert cat["identical_rate"] == 1.0 and cat["mean_accepted"] >= 1.0
    # batch 1 calls hold one category each; batch 2 mixes them, so no per-category speed there
    assert _row(report, "ngram", 1)["per_category"]["math"]["speedup_vs_hf"] > 0
    assert _row(report, "ngram", 2)["per_category"]["math"]["speedup_vs_hf"] is None
    assert _row(report, "ngram", 1)["per_category"]["math"]["tokens_per_second"] > 0
    assert _row(report, "ngram", 2)["per_category"]["math"]["tokens_per_second"] is None


def test_per_row_statistics_add_up(report):
    """Every ProPD row's accepted tokens over its steps, plus the prefill's first token, are its new tokens."""
    rows = [r for c in report["calls"] if c["method"] == "ngram" for r in c["rows"]]
    assert rows and all(r["accepted"] + 1 == r["new_tokens"] for r in rows)
    assert all(sum(r["tree_sizes"].values()) == r["steps"] for r in rows)


def test_a_method_that_raises_is_reported_failed(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench, "propd_generate", broken)
    rep = bench.run(tiny_model("llama"), _prompts()[:2], methods={"ngram": METHODS["ngram"]}, max_new_tokens=4,
                    progress=False)
    assert rep["methods"]["ngram"]["status"] == "failed: RuntimeError: boom"
    assert _row(rep, "ngram", 1)["status"].startswith("failed") and _row(rep, "hf", 1)["status"] == "ok"


def test_markdown_lists_every_row(report):
    md = bench.markdown(report)
    for r in report["results"]:
        assert f"| {r['method']} | {r['batch_size']} |" in md
    assert "unavailable: TypeError" in md and "| ngram | 1 |" in md and "| method | batch | math | writing |" in md


def test_write_md_keeps_hand_written_sections(report, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written intro\n\n## Older section\n\nkept\n")
    png = tmp_path / "suite.png"
    bench.plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = {**report, "settings": {**report["settings"], "command": "propd bench --test"}}
    for _ in range(2):  # the second write replaces the first
        bench.write_md(md, bench.suite_section(report, "suite.json", "suite.png"))
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written intro\n\n## Older section\n\nkept\n")
    assert text.count(bench.MD_BEGIN) == 1 and text.count(bench.MD_END) == 1
    for needle in ("propd bench --test", report["machine"]["torch"], "(suite.json)", "(suite.png)", "| ngram | 2 |"):
        assert needle in text
    text = text.replace("kept\n", "kept, edited\n") + "\n## After\n\nalso kept\n"
    md.write_text(text)
    bench.write_md(md, bench.suite_section(report, "suite.json", None))
    after = md.read_text()
    assert "kept, edited" in after and after.endswith("## After\n\nalso kept\n") and "(suite.png)" not in after


def test_cli_write_md_from_json_runs_nothing(report, tmp_path, monkeypatch):
    monkeypatch.setattr("propd_compile.models.load", lambda *a, **k: pytest.fail("--write-md JSON must not load a model"))
    path, md = tmp_path / "suite.json", tmp_path / "B.md"
    bench.save(report, path)
    assert main(["bench", "--write-md", str(path), "--md", str(md)]) == 0
    assert "| future | 2 |" in md.read_text() and (tmp_path / "suite.png").exists()


@pytest.mark.real_model
def test_turn2_prompts_follow_the_turn1_answer():
    from propd_compile import models, prompts

    _, tok = models.load()
    qs = prompts.mt_bench_sample(1)[:2]
    items = bench.mt_bench_prompts(tok, qs, turn2=True, answer=lambda texts: [f"REPLY{i}" for i in range(len(texts))])
    assert [(p.turn, p.group) for p in items] == [(1, qs[0].category), (1, qs[1].category),
                                                   (2, f"{qs[0].category} (turn 2)"), (2, f"{qs[1].category} (turn 2)")]
    text = tok.decode(items[3].input_ids)
    assert "REPLY1" in text and qs[1].turns[0] in text and qs[1].turns[1] in text


@pytest.mark.real_model
def test_bench_quick_smoke(tmp_path):
    """CI: `propd bench --quick` runs every method end to end; the exit code checks losslessness
    (every ProPD method identical to HF greedy, none failed), never speed."""
    out, md = tmp_path / "quick.json", tmp_path / "BENCHMARKS.md"
    assert main(["bench", "--quick", "--threads", "1", "--json", str(out), "--write-md", "--md", str(md)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["methods"]) == set(bench.QUICK_METHODS)
    assert rep["methods"]["hf"]["status"] == rep["methods"]["ngram"]["status"] == "ok"
    for r in rep["results"]:
        if r["status"] == "ok" and bench.METHODS[r["method"]].propd is not None:
            assert r["identical_rate"] == 1.0, r["method"]
    assert out.with_suffix(".png").exists() and "(quick.png)" in md.read_text()


def test_rows_with_generate_options_are_compared_with_their_reference():
    """A row with a repetition penalty is lossless against HF with the same penalty (its
    reference runs even when not asked for), not against plain HF, whose outputs differ."""
    methods = {"ngram-rep": Method("n-gram runtime, penalty", propd={"drafters": ("ngram",), "tree": "fixed"},
                                   generate=bench.REPETITION, reference="hf-rep")}
    rep = bench.run(tiny_model("llama"), _prompts(), methods=methods, max_new_tokens=MAX_NEW, progress=False)
    assert _row(rep, "ngram-rep", 1)["identical_rate"] == 1.0
    assert rep["methods"]["hf-rep"]["status"] == "ok" and rep["methods"]["ngram-rep"]["reference"] == "hf-rep"
    assert _row(rep, "hf-rep", 1)["identical_rate"] < 1.0  # HF with the penalty differs from plain HF here


def test_latency_report_measures_every_forward_against_hfs_own_step():
    """`propd bench --latency`: every forward at every batch and tree size, over HF's eager
    one-token step at the same batch (its cache cut back to the KV length after each step)."""
    from propd_compile.decoding import eager_forward

    model = tiny_model("llama")
    rep = bench.verify_latency(model, {"eager": eager_forward(model)}, sizes=(1, 4), batches=(1, 2), kv_len=16, repeats=2)
    assert set(rep["hf_step_ms"]) == {1, 2} and all(v > 0 for v in rep["hf_step_ms"].values())
    for b in (1, 2):
        for T in (1, 4):
            assert rep["ratio_to_hf_step"]["eager"][b][T] == pytest.approx(rep["ms"]["eager"][b][T] / rep["hf_step_ms"][b])
    assert "| 4 |" in bench.latency_markdown(rep)
