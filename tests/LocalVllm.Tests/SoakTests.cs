using System.Diagnostics;
using LocalVllm.Engine;
using Xunit.Abstractions;

namespace LocalVllm.Tests;

/// <summary>Resident memory is process-wide: the soak tests run alone, after the parallel tests.</summary>
[CollectionDefinition(nameof(SoakCollection), DisableParallelization = true)]
public sealed class SoakCollection;

/// <summary>
/// Native memory over thousands of requests: resident memory must level off. The short version runs in CI; the long
/// one is opt-in (<c>--filter Category=Soak</c>).
/// </summary>
[Collection(nameof(SoakCollection))]
public sealed class SoakTests(ITestOutputHelper output)
{
    [Fact]
    public void Resident_memory_levels_off_over_many_requests_short() => Soak(rounds: 24, perRound: 32, maxGrowthMb: 96);

    [Fact]
    [Trait("Category", "Soak")]
    public void Resident_memory_levels_off_over_many_requests_long() => Soak(rounds: 150, perRound: 64, maxGrowthMb: 96);

    private void Soak(int rounds, int perRound, int maxGrowthMb)
    {
        using var llm = new Llm(new EngineOptions { Model = Fixtures.Model("stories260K"), KvCacheMemoryBytes = 16L << 20 });
        var rng = new Random(1);
        var sampling = new SamplingParams { Temperature = 0.8f, TopK = 40, MaxTokens = 48, Seed = 3, Logprobs = 2 };
        long Rss()
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
            using var p = Process.GetCurrentProcess();
            p.Refresh();
            return p.WorkingSet64;
        }
        long baseline = 0;
        var samples = new List<long>();
        for (int r = 0; r < rounds; r++)
        {
            var prompts = Enumerable.Range(0, perRound).Select(_ => (IReadOnlyList<int>)[1, .. Enumerable.Range(0, rng.Next(4, 120)).Select(_ => rng.Next(3, 512))]).ToArray();
            llm.Generate(prompts, sampling);
            if (r == rounds / 4) baseline = Rss(); // after warm-up: allocator pools and caches are in place
            if (r >= rounds / 4) samples.Add(Rss());
        }
        long growth = samples[^1] - baseline;
        output.WriteLine($"{rounds * perRound} requests; RSS after warm-up {baseline >> 20} MB, at end {samples[^1] >> 20} MB, max {samples.Max() >> 20} MB, growth {growth >> 20} MB");
        Assert.True(growth < (long)maxGrowthMb << 20, $"resident memory grew by {growth >> 20} MB after warm-up");
        llm.Engine.Blocks.CheckInvariants(expectAllFree: true);
    }
}
