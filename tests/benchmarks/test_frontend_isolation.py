"""benchmarks/frontend_isolation.py: its helpers on fixed inputs (the idle connections against a
local asyncio server), and end to end on one real `neo serve` (the embedded model on the CPU): both
variants run to length, the loaded one with its background load running through the burst."""

from __future__ import annotations

import asyncio
import json

import pytest

from neo_bench.comparison import summarize_modes
from neo_bench.frontend_isolation import (LoadState, Variant, compare, hold_connection, load_figures, load_problems,
                                          main, parse_args, problems, prompt_text, read_response, summary)


def test_prompt_text_is_that_many_ascii_bytes_and_seeded():
    text = prompt_text(10_000, seed=1)
    assert len(text) == len(text.encode()) == 10_000 and text.isascii()
    assert text == prompt_text(10_000, seed=1) != prompt_text(10_000, seed=2)


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def test_read_response_reads_one_response_and_leaves_the_rest():
    async def go():
        r = _reader(b"HTTP/1.1 200 OK\r\ncontent-type: x\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 503 X\r\n\r\n")
        return await read_response(r), await read_response(r)

    assert asyncio.run(go()) == (200, 503)

    async def one(data: bytes) -> int:
        return await read_response(_reader(data))   # a StreamReader wants a running loop

    with pytest.raises(ValueError):
        asyncio.run(one(b"SSH-2.0 nope\r\n\r\n"))
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(one(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"))


def test_idle_connections_are_held_reopened_when_dropped_and_closed_at_stop():
    async def go():
        seen: list[int] = []
        closed = asyncio.Event()

        async def handle(reader, writer):
            seen.append(len(seen))
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if len(seen) == 1:   # the first connection is dropped by the server, the second held
                writer.close()
                return
            await reader.read()   # until the client closes it
            closed.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        state, stop = LoadState(1), asyncio.Event()
        task = asyncio.create_task(hold_connection("127.0.0.1", port, state, stop))
        for _ in range(200):
            if state.connections_opened == 2 and state.connections_open == 1:
                break
            await asyncio.sleep(0.02)
        held = state.snapshot()
        stop.set()
        await asyncio.wait_for(task, 5)
        await asyncio.wait_for(closed.wait(), 5)
        server.close()
        return held, state.snapshot()

    held, end = asyncio.run(go())
    assert (held["connections_opened"], held["connections_open"], held["connections_dropped"]) == (2, 1, 1)
    assert (end["connections_open"], end["connections_dropped"], end["connect_errors"]) == (0, 1, 0)


def _snap(t: float, open_: int, dropped: int = 0, sent: int = 0, done: int = 0, errors: int = 0,
          statuses: dict | None = None) -> dict:
    s = LoadState(3, 1000).snapshot()
    s.update(t=t, connections_open=open_, connections_dropped=dropped, big_prompts_sent=sent, big_prompts_done=done,
             big_prompt_errors=errors, big_prompt_statuses=statuses or {})
    return s


def test_load_figures_and_problems():
    good = load_figures(_snap(10.0, 3, sent=2, done=1, statuses={"400": 1}),
                        _snap(12.5, 3, sent=6, done=5, statuses={"400": 4, "413": 1}))
    assert good["during"] == {"connections_dropped": 0, "connect_errors": 0, "big_prompts_sent": 4,
                              "big_prompts_done": 4, "big_prompt_errors": 0,
                              "big_prompt_statuses": {"400": 3, "413": 1}, "seconds": 2.5}
    assert load_problems(good) == []
    # one big prompt in flight through the whole burst still counts as flowing
    assert load_problems(load_figures(_snap(0, 3, sent=2, done=1), _snap(1, 3, sent=2, done=1))) == []
    bad = load_problems(load_figures(_snap(0, 2, sent=1, done=1), _snap(1, 1, dropped=1, sent=1, done=1, errors=1)))
    assert bad == ["2 of 3 idle connections open at the burst's start", "1 of 3 idle connections open at the "
                   "burst's end", "1 idle connections dropped by the server during the burst",
                   "1 big prompts failed during the burst (None)", "no big prompt was in flight during the burst"]
    assert load_problems(load_figures(_snap(0, 3), None)) == \
        ["the background load's counters at the burst's end are missing"]


def test_problems_name_failed_and_short_requests():
    def rec(**kw) -> dict:
        return {"error": None, "finish_reason": "length", "tokens": 8, **kw}

    assert problems([rec(), rec()], 8) == []
    assert problems([rec(tokens=7)], 8) == ["finish_reason 'length' after 7 tokens (asked 8)"]
    assert problems([rec(error="APIError: boom")] * 3, 8) == ["APIError: boom"]


def _run(mode: str, tpot: float, overhead: float, tok_s: float = 100.0) -> dict:
    return {"mode": mode, "rep": 0, "tpot_s": {"p50": tpot}, "output_throughput": tok_s,
            "overhead_fraction": overhead, "iteration_s": 0.02, "worker_iteration_s": 0.0198, "problems": []}


def test_summary_verdict_is_no_difference_when_tpot_and_overhead_ranges_overlap():
    runs = [_run("quiet", t, o) for t, o in ((0.020, 0.004), (0.021, 0.006), (0.022, 0.005))] + \
           [_run("loaded", t, o) for t, o in ((0.0215, 0.005), (0.023, 0.007), (0.024, 0.008))]
    s = summary(runs)
    assert s["verdict"] == "no difference" and s["overhead_target"] == {"target": 0.01, "quiet": "met",
                                                                         "loaded": "met"}
    assert s["tpot_p50_s"]["loaded_vs_quiet"]["gap"] == pytest.approx(0.002)
    assert s["tpot_p50_s"]["spread"]["loaded"]["n"] == 3
    slow = summary(runs[:3] + [_run("loaded", t, 0.02) for t in (0.030, 0.031, 0.032)])
    assert slow["verdict"] == "difference" and slow["overhead_target"]["loaded"] == "missed"
    assert slow["tpot_p50_s"]["loaded_vs_quiet"]["verdict"] == "higher under load"
    unfit = summary(runs[:3] + [{**_run("loaded", 0.02, 0.005), "problems": ["x"]}])
    assert unfit["verdict"] is None and unfit["tpot_p50_s"]["spread"]["loaded"] is None


def test_compare_lower_under_load():
    fig = summarize_modes({"quiet": [{"x": 3.0}, {"x": 4.0}], "loaded": [{"x": 1.0}, {"x": 2.0}]},
                          lambda r: r["x"], "quiet")
    assert compare(fig) == {"gap": -2.0, "verdict": "lower under load"}


def test_arguments():
    args = parse_args([])
    assert (args.concurrency, args.reps, args.idle_connections, args.big_prompt_bytes) == (64, 3, 1000, 1 << 20)
    assert args.order == ["quiet#0", "loaded#0", "loaded#1", "quiet#1", "quiet#2", "loaded#2"]
    assert args.variants == {"load": ("off", ["--keep-alive-s", "3600"])}
    big = parse_args(["--idle-connections", "3000", "--concurrency", "256"])
    assert big.variants["load"][1] == ["--keep-alive-s", "3600", "--max-connections", str(3000 + 256 + 64)]
    for bad in (["--reps", "0"], ["--concurrency", "0"], ["--idle-connections", "-1"], ["--label", "a/b"],
                ["--vocab", "50"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.integration
def test_both_variants_on_the_embedded_model_with_the_load_running(tmp_path, capsys):
    # --max-model-len 256: a prompt over 256 x 81 characters (SmolLM2's longest token) is refused before
    # it is tokenized; 20000 bytes are tokenized whole (~6000 tokens), then refused for the context
    code = main(["--device", "cpu", "--num-gpu-blocks", "48", "--max-model-len", "256", "--max-num-seqs", "8",
                 "--concurrency", "4", "--input-len", "16", "--output-len", "16", "--reps", "2", "--vocab", "49152",
                 "--idle-connections", "50", "--big-prompt-bytes", "20000",
                 "--ready-timeout", "120", "--stop-grace", "20", "--label", "ci", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed + (tmp_path / "serve_ci_load.log").read_text()[-3000:]
    report = json.loads((tmp_path / "frontend_isolation_ci.json").read_text())
    assert set(report) == {"config", "hardware", "order", "server", "runs", "summary"}
    assert (tmp_path / "frontend_isolation_ci.png").stat().st_size > 0
    assert report["order"] == ["quiet#0", "loaded#0", "loaded#1", "quiet#1"]
    assert [f"{r['mode']}#{r['rep']}" for r in report["runs"]] == report["order"]
    assert report["server"]["warmup_quiet_problems"] == report["server"]["warmup_loaded_problems"] == []
    assert "--keep-alive-s" in report["server"]["serve_args"]
    for run in report["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0 and run["problems"] == []
        assert run["output_throughput"] > 0 and run["tpot_s"]["p50"] > 0
        assert run["iterations"] >= 15 and run["worker_iteration_s"] > 0 and run["iteration_s"] > 0
        assert run["overhead_fraction"] is not None
        assert ("load" in run) is (run["mode"] == "loaded")
    for run in (r for r in report["runs"] if r["mode"] == "loaded"):
        start, end = run["load"]["start"], run["load"]["end"]
        assert start["connections_open"] == end["connections_open"] == 50 == start["connections_requested"]
        assert run["load"]["during"]["connections_dropped"] == 0
        assert start["big_prompts_done"] >= 1 and end["big_prompts_sent"] >= 1
        assert end["big_prompt_errors"] == 0 and set(end["big_prompt_statuses"]) == {"400"}
        assert "maximum context length" in end["big_prompt_messages"]["400"]
        assert "characters" not in end["big_prompt_messages"]["400"]   # tokenized, not refused by the bound
    summary_ = report["summary"]
    for key in ("tpot_p50_s", "output_throughput", "overhead_fraction"):
        for v in Variant:
            s = summary_[key]["spread"][v.value]
            assert s["n"] == 2 and s["min"] <= s["median"] <= s["max"]
        assert summary_[key]["loaded_vs_quiet"]["verdict"] in ("no difference", "higher under load",
                                                                 "lower under load")
    assert summary_["verdict"] in ("no difference", "difference")
    lines = printed.strip().splitlines()
    assert lines[0].split()[:3] == ["variant", "reps", "TPOT"] and lines[-1].startswith("hardware:")
    assert sum(ln.startswith("load loaded#") for ln in lines) == 2
    assert {tuple(ln.split()[:2]) for ln in lines} >= {("quiet", "2"), ("loaded", "2")}
