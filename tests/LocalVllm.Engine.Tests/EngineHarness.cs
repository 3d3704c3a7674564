using LocalVllm.Engine.Core;
using LocalVllm.Engine.Execution;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

internal static class EngineHarness
{
    public static EngineOptions Options(string model, Action<EngineOptions>? configure = null)
    {
        var o = new EngineOptions { Model = Fixtures.Model(model), KvCacheMemoryBytes = 8L << 20 };
        configure?.Invoke(o);
        return o;
    }

    /// <summary>Logits at every prompt position, through the paged cache, as one sequence; blocks are released after.</summary>
    public static float[][] AllPositionLogits(LlmEngine engine, int[] ids)
    {
        using var scope = NewDisposeScope();
        var seq = new Sequence("score", 0, ids, new SamplingParams { PromptLogprobs = 0 }, 0);
        engine.Blocks.Allocate(seq, [], ids.Length);
        try
        {
            var step = engine.Runner.ComputeLogits([new ScheduledSequence(seq, ids.Length)]);
            var rows = new float[ids.Length][];
            for (int i = 0; i < ids.Length; i++) rows[i] = step.Logits[i].data<float>().ToArray();
            return rows;
        }
        finally
        {
            engine.Blocks.Free(seq);
        }
    }

    public static float MaxAbsDiff(float[] a, float[] b)
    {
        Assert.Equal(b.Length, a.Length);
        float m = 0;
        for (int i = 0; i < a.Length; i++) m = Math.Max(m, Math.Abs(a[i] - b[i]));
        return m;
    }

    /// <summary>The leak invariant: every block free (or cached) with reference count zero, counts adding up.</summary>
    public static void AssertNoLeaks(LlmEngine engine)
    {
        Assert.False(engine.HasUnfinishedRequests);
        engine.Blocks.CheckInvariants(expectAllFree: true);
        Assert.Equal(engine.Blocks.NumBlocks, engine.Blocks.NumFreeBlocks);
    }

    public static SamplingParams Greedy(int maxTokens) => new() { Temperature = 0, MaxTokens = maxTokens, IgnoreEos = true };
}
