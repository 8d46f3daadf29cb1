"""Load test of `peftkit serve`: many adapters over SmolLM2-135M on loopback, against peft's `adapter_names` path.

    nice -n 10 python benchmarks/serve_load.py                      # 500 requests, 16 adapters, concurrency 16
    nice -n 10 python benchmarks/serve_load.py --requests 96 --max-tokens 8,48

1. ``--adapters`` LoRA adapters (r=8 on q_proj/v_proj, A and B random so every adapter changes the
   output) are saved to a temporary directory in the Hugging Face PEFT format.
2. ``peftkit serve`` starts in a subprocess on a free loopback port with all of them
   (``--max-adapters`` = their count unless given). A fixed list of ``--requests`` completion
   requests (prompt i mod 16, adapter i mod N, greedy, ``max_tokens`` drawn uniformly from the
   ``--max-tokens`` range with a fixed seed) is sent with ``--concurrency`` requests in flight;
   the run stops when every request has an answer. Reported: generated tokens per second (sum
   of ``usage.completion_tokens`` over the wall time), p50/p99 request latency, failed requests and
   the server's peak RSS (``VmHWM``).
3. The same requests go through peft in the same process after the server has stopped:
   ``PeftModel.generate(..., adapter_names=[...])`` on batches of ``--concurrency`` requests in
   arrival order (static batching: a batch runs to its longest ``max_tokens``; each request is
   credited with its own tokens only, up to eos). The ratio is server tokens/s over peft tokens/s.
   Greedy texts of both are compared (left padding in peft's batches may flip rare near-ties).
   ``--dtype bfloat16`` serves the base and the adapters in bfloat16 on both sides; ``--server-args``
   passes more flags to the server (``--server-args=--no-prepack``, ``--server-args='--engine padded'``) to
   measure its parts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PROMPTS = [
    "The capital of France is", "Write a haiku about the sea:", "List three prime numbers:",
    "Explain photosynthesis in one sentence:", "Translate 'good morning' into Spanish:", "Once upon a time,",
    "The best way to learn programming is", "Give me a name for a cat:", "What is 12 times 7?",
    "Describe the color blue to someone who cannot see:", "A recipe for pancakes starts with",
    "The three laws of motion are", "Summarise the plot of Hamlet:", "My favourite season is autumn because",
    "def fibonacci(n):", "Q: Why is the sky blue?\nA:",
]


def make_adapters(root: Path, n: int, seed: int = 0) -> list[Path]:
    import peftkit
    from peftkit.hub.models import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m")
    dirs = []
    for i in range(n):
        name = f"user{i:03d}"
        peftkit.attach(model, peftkit.LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), name=name)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, p in peftkit.adapter_parameters(model, name).items():
                std = 0.02 if "lora_A" in pname else 0.05
                p.copy_(torch.randn(p.shape, generator=g) * std)
        dirs.append(peftkit.save(model, root / name, name=name, format="hf"))
        peftkit.delete(model, name)
    return dirs


def requests(n: int, adapters: int, lo: int, hi: int, seed: int) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    return [(f"user{i % adapters:03d}", PROMPTS[i % len(PROMPTS)], rng.randint(lo, hi)) for i in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, reqs: list[tuple[str, str, int]], concurrency: int) -> tuple[list, float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results: list = [None] * len(reqs)

    async def one(i: int, client: httpx.AsyncClient) -> None:
        name, prompt, max_tokens = reqs[i]
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/completions", json={"model": name, "prompt": prompt,
                                                                       "max_tokens": max_tokens, "temperature": 0})
                body = r.json()
                ok = r.status_code == 200
                results[i] = (ok, time.perf_counter() - t0, body["usage"]["completion_tokens"] if ok else 0,
                              body["choices"][0]["text"] if ok else body)
            except Exception as e:  # counted as a failed request
                results[i] = (False, time.perf_counter() - t0, 0, repr(e))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(len(reqs))))
        return results, time.perf_counter() - t0


class Server:
    """`peftkit serve` in a subprocess on a free loopback port."""

    def __init__(self, dirs: list[Path], concurrency: int, max_adapters: int, threads: int, dtype: str,
                 extra: list[str]) -> None:
        import httpx

        port = free_port()
        cmd = [sys.executable, "-m", "peftkit.cli.main", "serve", "--model", "smollm2-135m", "--port", str(port),
               "--max-adapters", str(max_adapters), "--max-batch", str(concurrency), "--dtype", dtype,
               *extra, "--adapters", *map(str, dirs)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("the server did not start in 600 s")
            time.sleep(0.5)

    def run(self, reqs, concurrency: int) -> tuple[list, float]:
        return asyncio.run(drive(self.url, reqs, concurrency))

    def metrics(self) -> dict[str, str]:
        import httpx

        text = httpx.get(self.url + "/metrics").text
        return dict(ln.split() for ln in text.splitlines() if ln and not ln.startswith("#") and "{" not in ln)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PeftBaseline:
    """The same adapters in one peft model; requests answered with `generate(..., adapter_names=...)`."""

    def __init__(self, dirs: list[Path], dtype: str) -> None:
        from peft import PeftModel

        from peftkit.hub.models import load_causal_lm

        base, self.tok = load_causal_lm("smollm2-135m")
        self.model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
        for d in dirs[1:]:
            self.model.load_adapter(str(d), adapter_name=d.name)
        self.model.to(getattr(torch, dtype))  # the base and every adapter, as the server does
        self.model.eval()

    @torch.no_grad()
    def run(self, reqs, batch: int) -> tuple[list[str], int, float]:
        tok = self.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = tok.eos_token_id
        texts, tokens = [], 0
        t0 = time.perf_counter()
        for s in range(0, len(reqs), batch):
            chunk = reqs[s:s + batch]
            enc = [tok(p)["input_ids"] for _, p, _ in chunk]
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(m for _, _, m in chunk),
                                      do_sample=False, pad_token_id=pad, adapter_names=[n for n, _, _ in chunk])
            for (_, _, m), row in zip(chunk, out[:, width:].tolist(), strict=True):
                row = row[:m]
                if eos in row:
                    row = row[:row.index(eos) + 1]  # eos counts as a generated token, as in the server's usage
                tokens += len(row)
                texts.append(tok.decode(row, skip_special_tokens=True))
        return texts, tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="the requests are split into rounds; server and peft "
                                                          "alternate round by round (load drift hits both)")
    ap.add_argument("--max-adapters", type=int, default=None, help="server's in-memory limit (default: all)")
    ap.add_argument("--max-tokens", default="8,64", help="LO,HI: max_tokens per request drawn uniformly")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype of the base and the adapters on both sides")
    ap.add_argument("--server-args", default="",
                    help="more `peftkit serve` flags as one string: --server-args=--no-prepack, "
                         "--server-args='--engine padded'")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its server (finally)
    lo, hi = (int(x) for x in args.max_tokens.split(","))
    torch.set_num_threads(args.threads)
    reqs = requests(args.requests, args.adapters, lo, hi, args.seed)
    per = -(-len(reqs) // args.rounds)
    rounds = [reqs[i:i + per] for i in range(0, len(reqs), per)]
    srv_results: list = []
    srv_wall = peft_wall = 0.0
    peft_texts: list[str] = []
    peft_tokens = 0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(Path(tmp), args.adapters, args.seed)
        server = Server(dirs, args.concurrency, args.max_adapters or args.adapters, args.threads, args.dtype,
                        args.server_args.split())
        try:
            peft = None if args.skip_peft else PeftBaseline(dirs, args.dtype)
            warm = requests(args.concurrency, args.adapters, lo, lo, args.seed + 1)
            server.run(warm, args.concurrency)  # warm-up, not counted
            if peft is not None:
                peft.run(warm, args.concurrency)
            per_round = []
            for k, chunk in enumerate(rounds):
                order = ["server", "peft"] if k % 2 == 0 else ["peft", "server"]
                rate = {}
                for side in order:
                    if side == "server":
                        res, wall = server.run(chunk, args.concurrency)
                        srv_results += res
                        srv_wall += wall
                        rate["server"] = sum(r[2] for r in res) / wall
                    elif peft is not None:
                        texts, toks, wall = peft.run(chunk, args.concurrency)
                        peft_texts += texts
                        peft_tokens += toks
                        peft_wall += wall
                        rate["peft"] = toks / wall
                per_round.append(rate)
                print(f"round {k + 1}/{len(rounds)} done ({time.perf_counter() - t_start:.0f} s): "
                      + ", ".join(f"{side} {v:.1f} tokens/s" for side, v in rate.items()), file=sys.stderr, flush=True)
            rss = peak_rss_mb(server.proc.pid)
            metrics = server.metrics()
        finally:
            server.close()
    lat = sorted(r[1] for r in srv_results)
    tokens = sum(r[2] for r in srv_results)
    failed = sum(not r[0] for r in srv_results)
    tps = tokens / srv_wall
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, {args.dtype}; "
          f"{len(reqs)} requests "
          f"over {args.adapters} adapters, concurrency {args.concurrency}, max_tokens {lo}..{hi}, greedy, "
          f"{len(rounds)} alternating rounds; server flags: {args.server_args or '(defaults)'}")
    print(f"peftkit serve: {tokens} tokens in {srv_wall:.1f} s = {tps:.1f} tokens/s; latency p50 "
          f"{statistics.median(lat):.2f} s, p99 {lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.2f} s; failed {failed}; "
          f"peak RSS {rss:.0f} MB; forwards mixed {metrics.get('peftkit_mixed_steps_total')} merged "
          f"{metrics.get('peftkit_merged_steps_total')}")
    if failed:
        print("first failure:", next(r[3] for r in srv_results if not r[0]))
    if args.skip_peft:
        return
    same = sum(r[3] == t for r, t in zip(srv_results, peft_texts, strict=True))
    print(f"peft adapter_names (batch {args.concurrency}): {peft_tokens} tokens in {peft_wall:.1f} s = "
          f"{peft_tokens / peft_wall:.1f} tokens/s")
    ratios = [r["server"] / r["peft"] for r in per_round]
    print(f"throughput ratio peftkit serve / peft: {tps / (peft_tokens / peft_wall):.2f}x overall, per round "
          f"{', '.join(f'{x:.2f}x' for x in ratios)} (median {statistics.median(ratios):.2f}x; rounds that disagree "
          f"mean the machine's load changed); identical greedy texts: {same}/{len(reqs)}")


if __name__ == "__main__":
    main()
