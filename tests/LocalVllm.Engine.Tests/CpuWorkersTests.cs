using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Engine.Tests;

/// <summary>No other test class runs beside these: the shared workers must be free for the tests to reach them.</summary>
[CollectionDefinition(nameof(CpuWorkersTests), DisableParallelization = true)]
public sealed class CpuWorkersCollection;

/// <summary>The kernels' worker threads run every index exactly once, whatever the timing, and report failures.</summary>
[Collection(nameof(CpuWorkersTests))]
public sealed class CpuWorkersTests
{
    [Fact]
    public void Every_index_runs_exactly_once_also_after_the_workers_went_to_sleep()
    {
        foreach (int count in new[] { 1, 2, 3, 16, 1000 })
            for (int round = 0; round < 3; round++)
            {
                var hits = new int[count];
                CpuWorkers.Shared.For(count, i => Interlocked.Increment(ref hits[i]));
                Assert.All(hits, h => Assert.Equal(1, h));
                // Longer than the workers poll: the next loop has to wake them.
                if (round == 1) Thread.Sleep((int)(CpuWorkers.SpinMilliseconds * 20));
            }
    }

    [SkippableFact]
    public void Work_is_shared_with_a_worker_thread()
    {
        Skip.If(Environment.ProcessorCount < 2, "one processor: the kernels start no worker threads");
        // Items long enough that the caller cannot finish them all before a worker arrives. Tests of other classes may
        // hold the workers at the moment (this loop then goes to Parallel.For), so try a few times.
        int sawWorker = 0;
        for (int attempt = 0; attempt < 50 && Volatile.Read(ref sawWorker) == 0; attempt++)
            CpuWorkers.Shared.For(16, _ =>
            {
                if (Thread.CurrentThread.Name?.StartsWith("LocalVllm CPU worker", StringComparison.Ordinal) == true)
                    Interlocked.Exchange(ref sawWorker, 1);
                Thread.SpinWait(100_000);
            });
        Assert.Equal(1, sawWorker);
    }

    [Fact]
    public void A_failing_item_is_rethrown_to_the_caller_after_the_others_ran()
    {
        int ran = 0;
        var e = Assert.Throws<InvalidOperationException>(() => CpuWorkers.Shared.For(50, i =>
        {
            Interlocked.Increment(ref ran);
            if (i == 7) throw new InvalidOperationException("item 7");
        }));
        Assert.Equal("item 7", e.Message);
        Assert.Equal(50, ran);
        // The workers are usable afterwards.
        int after = 0;
        CpuWorkers.Shared.For(10, _ => Interlocked.Increment(ref after));
        Assert.Equal(10, after);
    }

    [Fact]
    public void Nested_and_concurrent_loops_complete()
    {
        long total = 0;
        // Loops inside a loop (they go to Parallel.For while the outer one holds the workers) ...
        CpuWorkers.Shared.For(8, _ => CpuWorkers.Shared.For(8, _ => Interlocked.Increment(ref total)));
        Assert.Equal(64, total);
        // ... and loops from several threads at once.
        total = 0;
        Parallel.For(0, 4, _ =>
        {
            for (int r = 0; r < 50; r++) CpuWorkers.Shared.For(20, _ => Interlocked.Increment(ref total));
        });
        Assert.Equal(4 * 50 * 20, total);
    }
}
