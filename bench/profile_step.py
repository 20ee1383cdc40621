"""Where one eager decode step of GPT-Neo 2.7B (fp16, random weights) spends GPU time, by kernel:
the same kernels a CUDA-graph replay runs, timed by the profiler one by one. With `--prefill BxL`,
a whole 1-token generate call of B fresh L-token prompts instead (what time to first token
measures): its wall time beside its kernel time, and the host ops that take the most time. With
`--graph`, the decode step's CUDA-graph replay instead: its span from first kernel start to last
kernel end against the sum of its kernels, and the idle time before each kernel (the launch gap
after the previous one ends; PDL launches overlap, so those count zero), by kernel. With `--engine`,
decode steps as `generate` runs them, what runs between the graph replays included.

    python3 bench/profile_step.py --batch 1 [--graph | --engine] [--prompt 96]
    python3 bench/profile_step.py --prefill 1x32,32x32,1x512
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
from actors.sequence import SamplingParams, Sequence  # noqa: E402
from bench.decode import build, dtype_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", default="neo")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--prefill", default="", help="profile prefills instead: comma list of BATCHxLENGTH")
    ap.add_argument("--graph", action="store_true", help="the decode graph's replay: span, kernels, gaps")
    ap.add_argument("--engine", action="store_true",
                    help="steady-state decode through engine.step(): wall, GPU busy and idle a step, every op")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens of each decoding sequence")
    args = ap.parse_args()
    engine = rayspeed.init_inference(build(args.model), **dtype_args(args.dtype), replace_with_kernel_inject=True,
                                     gpu_memory_utilization=0.5).backend
    if args.prefill:
        for shape in args.prefill.split(","):
            batch, length = (int(n) for n in shape.split("x"))
            profile_prefill(engine, batch, length, args)
        return
    if args.engine:
        engine_steps(engine, args)
        return
    seqs = [engine.add_request(list(range(100 + i, 100 + i + args.prompt)),
                               SamplingParams(max_new_tokens=64, ignore_eos=True)) for i in range(args.batch)]
    for _ in range(4):
        engine.step()
    runner = engine.runner
    ids, pos, meta = runner.prepare_decode(seqs)
    if args.graph:
        graph_gaps(lambda: runner.graphs.run(ids, pos, meta), args)
        return
    runner.graphs = None
    step = lambda: runner._forward(ids, pos, meta, False)       # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    report(prof, 5, {"model": args.model, "dtype": args.dtype, "batch": args.batch}, args.top)


def report(prof, repeats: int, header: dict, top: int, host: bool = False) -> None:
    totals, counts, cpu = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:90]] += event.device_time / repeats
            counts[event.name[:90]] += 1 / repeats
        elif host:
            cpu[event.name[:90]] += event.self_cpu_time_total / repeats
    total = sum(totals.values())
    print(json.dumps({**header, "kernel_us_per_step": total, "kernels_per_step": sum(counts.values())}))
    for name, us in totals.most_common(top):
        print(f"{us:9.1f} us {us / total:6.1%} x{counts[name]:5.0f}  {name}")
    if host:
        print("host ops by self CPU time (us per call of the step):")
        for name, us in cpu.most_common(top):
            print(f"{us:9.1f} us  {name}")


def engine_steps(engine, args, steps: int = 20) -> None:
    """Decode as `generate` runs it (CUDA graphs, each step launched while the one before runs):
    wall ms a step without the profiler; under it, the GPU's period a step, its busy time (the union
    of every op's interval) and idle time, and every op a step by name (the graph's kernels and what
    runs between replays: input copies, the argmax, the token's copy to the host)."""
    for i in range(args.batch):
        engine.add_request(list(range(100 + i, 100 + i + args.prompt)),
                           SamplingParams(max_new_tokens=3 * steps + 40, ignore_eos=True))
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    busy, end = 0.0, events[0].time_range.start
    for e in events:                                    # the union of the ops' intervals
        busy += max(0.0, e.time_range.end - max(end, e.time_range.start))
        end = max(end, e.time_range.end)
    period = (end - events[0].time_range.start) / steps
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "wall_ms_per_step": wall_ms,
                      "gpu_period_us": period, "busy_us": busy / steps, "idle_us": period - busy / steps,
                      "ops_per_step": len(events) / steps}))
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        totals[e.name[:90]] += e.device_time / steps
        counts[e.name[:90]] += 1 / steps
    for name, us in sorted(totals.items(), key=lambda kv: counts[kv[0]])[:args.top]:     # the rarest first
        print(f"{us:9.1f} us x{counts[name]:5.1f}  {name}")


def graph_gaps(replay, args, repeats: int = 5) -> None:
    """Span, kernel time and idle time before each kernel of a decode graph replay, per step."""
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            replay()
            torch.cuda.synchronize()              # replays apart, so each step's span is its own
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                     and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                    key=lambda e: e.time_range.start)
    steps, end = [[]], None                       # replays are apart by a host synchronisation (> 50 us)
    for e in events:
        if end is not None and e.time_range.start - end > 50:
            steps.append([])
        steps[-1].append(e)
        end = e.time_range.end if end is None else max(end, e.time_range.end)
    repeats, per_step = len(steps), len(events) / len(steps)
    spans, busy, idle, before = [], [], [], collections.Counter()
    for step in steps:
        spans.append(step[-1].time_range.end - step[0].time_range.start)
        busy.append(sum(e.time_range.end - e.time_range.start for e in step))
        end, gaps = step[0].time_range.end, 0.0
        for e in step[1:]:
            gap = max(0.0, e.time_range.start - end)
            before[e.name[:70]] += gap / repeats
            gaps += gap
            end = max(end, e.time_range.end)
        idle.append(gaps)
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "kernels_per_step": per_step,
                      "span_us": statistics.median(spans), "kernel_us": statistics.median(busy),
                      "idle_us": statistics.median(idle)}))
    for name, us in before.most_common(args.top):
        print(f"{us:9.1f} us idle before  {name}")
    print("a layer's kernels in order, by their place from decode attention: what each adds to the step "
          "(its end past the latest end before it; PDL kernels start early, so their own spans overlap)")
    for place, (name, us) in layer_increments(steps).items():
        print(f"{place:+3d} {us:8.2f} us  {name}")


def layer_increments(steps: list[list]) -> dict[int, tuple[str, float]]:
    """{place from the layer's attention kernel: (kernel name, mean us it adds to the step)} over the
    layers of every step but the first and last (their neighbours are the embedding and the LM head)."""
    adds = collections.defaultdict(list)
    names = {}
    for step in steps:
        ends, latest = [], step[0].time_range.end
        for e in step:
            ends.append(max(0.0, e.time_range.end - latest))
            latest = max(latest, e.time_range.end)
        attention = [i for i, e in enumerate(step) if "decode_kernel" in e.name]
        for a, b in zip(attention[1:-1], attention[2:]):      # from one layer's attention to the next's
            period = b - a
            for place in range(period):                       # the first half after a, the rest before b
                offset = place if place < period // 2 else place - period
                adds[offset].append(ends[a + place])
                names[offset] = step[a + place].name[:60]
    return {o: (names[o], statistics.mean(v)) for o, v in sorted(adds.items())}


def profile_prefill(engine, batch: int, length: int, args) -> None:
    """Wall time of `batch` fresh prompts of `length` tokens to their first token, and its profile."""
    vocab, seed = engine.model.spec.vocab_size, iter(range(10**6))
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def call():
        g = torch.Generator().manual_seed(next(seed))
        engine.generate(torch.randint(100, vocab - 100, (batch, length), generator=g).tolist(), params)

    walls = walls_ms(call, 6)
    split = replay_split(engine, batch, length)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            call()
        torch.cuda.synchronize()
    report(prof, 3, {"model": args.model, "dtype": args.dtype, "batch": batch, "prefill": length,
                     "wall_ms_median": statistics.median(walls[1:]), "wall_ms": walls, **split}, args.top, host=True)


def walls_ms(fn, runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls of `fn`, from an idle GPU to the end of its work."""
    walls = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
    return walls


def replay_split(engine, batch: int, length: int) -> dict:
    """The prefill step alone, in ms: its graph replayed back to back (the GPU's time); one replay from
    an idle GPU, timed by events around it (adds what the launch keeps the GPU waiting); `runner.run`
    from its call to the end of its work (host arrays, the one input copy, the launch), and its host
    time alone; of that, building the host arrays and the graph launch call (medians)."""
    runner = engine.runner
    seqs = [Sequence([100 + (i + j) % 1000 for j in range(length)], SamplingParams(max_new_tokens=1))
            for i in range(batch)]
    for seq in seqs:
        engine.block_manager.allocate(seq)

    def run():
        for seq in seqs:
            seq.num_cached_tokens = 0
        runner.run(seqs, True)

    def host_ms(fn, calls: int = 20) -> float:
        times = []
        for _ in range(calls):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    try:
        run()
        tokens, seqs_in = runner.prefill_graphs.bucket(batch * length, batch)
        graph = runner.prefill_graphs.graphs[tokens, seqs_in][0]
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        back_to_back = start.elapsed_time(end) / 10
        alone = []
        for _ in range(10):
            torch.cuda.synchronize()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            alone.append(start.elapsed_time(end))
        result = {"replay_ms_back_to_back": back_to_back, "replay_ms_alone_events": statistics.median(alone),
                  "run_ms_alone": statistics.median(walls_ms(run, 10)), "run_host_ms": host_ms(run),
                  "arrays_host_ms": host_ms(lambda: runner._prefill_arrays(seqs)),
                  "graph_launch_host_ms": host_ms(graph.replay)}
    finally:
        for seq in seqs:
            engine.block_manager.deallocate(seq)
    return result


if __name__ == "__main__":
    main()
