using System.Diagnostics;
using System.Runtime.ExceptionServices;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// The threads that run the C# CPU kernels' parallel loops (linear layers, decode attention, layer ops, argmax).
/// A decode step runs about 170 such loops of 0.1-3 ms each, separated by short serial stretches. Parallel.For hands
/// each loop to thread-pool workers that have usually gone to sleep in between: measured here, waking them cost 15-130
/// microseconds per loop (up to 580 after a 0.5 ms serial stretch), against 5-10 for these workers, which keep
/// polling for the next loop for <see cref="SpinMilliseconds"/> (yielding the core to any other runnable thread while
/// they do) and only then block. The calling thread always takes part, so <c>ProcessorCount - 1</c> workers fill the
/// machine. A loop started while another is running (a second engine in the process, a loop inside a loop) goes to
/// Parallel.For instead, so callers never wait on each other.
/// </summary>
internal sealed class CpuWorkers
{
    /// <summary>How long an idle worker keeps polling for the next loop before it blocks.</summary>
    public const double SpinMilliseconds = 1.0;

    /// <summary>The process-wide workers (one fewer than the processors: the caller is the last one).</summary>
    public static CpuWorkers Shared { get; } = new(Environment.ProcessorCount - 1);

    private readonly int _workers;
    private readonly long _spinTicks = (long)(SpinMilliseconds * Stopwatch.Frequency / 1000);
    private readonly object _sleep = new();
    private int _busy; // 1 while a loop runs on these workers
    private int _sleepers;
    private Job? _job; // the current loop; workers read it once per generation
    private long _generation;

    private CpuWorkers(int workers)
    {
        _workers = Math.Max(0, workers);
        for (int i = 0; i < _workers; i++)
            new Thread(Work) { IsBackground = true, Name = $"LocalVllm CPU worker {i + 1}" }.Start();
    }

    /// <summary>Runs <paramref name="body"/> for 0..<paramref name="count"/>-1 across the caller and the workers; returns when all are done.</summary>
    public void For(int count, Action<int> body)
    {
        if (count <= 0) return;
        if (count == 1 || _workers == 0)
        {
            for (int i = 0; i < count; i++) body(i);
            return;
        }
        if (Interlocked.CompareExchange(ref _busy, 1, 0) != 0)
        {
            Parallel.For(0, count, new ParallelOptions { MaxDegreeOfParallelism = _workers + 1 }, body);
            return;
        }
        try
        {
            var job = new Job(body, count);
            Volatile.Write(ref _job, job);
            Interlocked.Increment(ref _generation); // full fence: a worker about to sleep sees it, or we see the sleeper
            if (Volatile.Read(ref _sleepers) > 0)
                lock (_sleep) Monitor.PulseAll(_sleep);
            job.Run();
            var spin = new SpinWait();
            while (Volatile.Read(ref job.Done) < count) spin.SpinOnce(sleep1Threshold: -1);
            if (job.Error is { } error) ExceptionDispatchInfo.Throw(error);
        }
        finally
        {
            Volatile.Write(ref _job, null); // the finished loop's body (and what it captured) is not kept alive
            Volatile.Write(ref _busy, 0);
        }
    }

    private void Work()
    {
        long seen = 0;
        while (true)
        {
            long start = Stopwatch.GetTimestamp();
            var spin = new SpinWait();
            while (Volatile.Read(ref _generation) == seen)
            {
                if (Stopwatch.GetTimestamp() - start < _spinTicks)
                {
                    spin.SpinOnce(sleep1Threshold: -1);
                    continue;
                }
                lock (_sleep)
                {
                    Interlocked.Increment(ref _sleepers); // full fence before re-reading the generation
                    try
                    {
                        while (Volatile.Read(ref _generation) == seen) Monitor.Wait(_sleep);
                    }
                    finally
                    {
                        Interlocked.Decrement(ref _sleepers);
                    }
                }
            }
            seen = Volatile.Read(ref _generation);
            // A worker that wakes late may find a later loop's job (it then helps with that one) or a finished one
            // (its index counter is past the end: nothing to do).
            Volatile.Read(ref _job)?.Run();
        }
    }

    /// <summary>One loop: indices are handed out one at a time, so uneven items balance themselves.</summary>
    private sealed class Job(Action<int> body, int count)
    {
        public int Next;
        public int Done;
        public Exception? Error;

        public void Run()
        {
            int i;
            while ((i = Interlocked.Increment(ref Next) - 1) < count)
            {
                try
                {
                    body(i);
                }
                catch (Exception e)
                {
                    Interlocked.CompareExchange(ref Error, e, null);
                }
                Interlocked.Increment(ref Done);
            }
        }
    }
}
